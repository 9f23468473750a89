"""Lead traits made ready for ad-platform audiences: normalised, then SHA-256 hashed.

Meta and Google match an uploaded customer list by comparing SHA-256 hashes with hashes
of their own users' data, so a value matches only if it was normalised to exactly the
string the platform hashes on its side. One stray capital, space or '+' and the row
matches nobody, and both platforms accept the upload all the same. Each function here
applies one platform's published rule to one trait; nothing does I/O.

Traits come from tracking `identify` calls: user input, of any type. Nothing here raises
on it. A value that cannot be normalised becomes "" and is exported empty, never guessed
into something that could match the wrong person.

Rules followed:
- Meta, Customer File Custom Audiences, "Hashing and normalization for multi-key":
  https://developers.facebook.com/docs/marketing-api/audiences/guides/custom-audiences#hash
  with the worked examples of the same rules in the Conversions API reference:
  https://developers.facebook.com/docs/marketing-api/conversions-api/parameters/customer-information-parameters
- Google Customer Match, Data Manager API "Format user data":
  https://developers.google.com/data-manager/api/devguides/concepts/formatting
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Mapping

import phonenumbers

META_SCHEMA = ("EMAIL", "PHONE", "FN", "LN", "CT", "ST", "ZIP", "COUNTRY")
GOOGLE_HEADER = ("Email", "Phone", "First Name", "Last Name", "Country", "Zip")

_GOOGLE_MAIL_DOMAINS = frozenset({"gmail.com", "googlemail.com"})
# The alpha-2 codes a lead can live at: every region with a telephone numbering plan
# (every inhabited ISO 3166-1 one, plus the reserved AC and TA and Kosovo's XK) and the
# all but uninhabited territories that have no plan of their own.
_COUNTRIES = phonenumbers.SUPPORTED_REGIONS | {"AQ", "BV", "GS", "HM", "PN", "TF", "UM"}
_US_ZIP = re.compile(r"([0-9]{5})(?:[ -]?[0-9]{4})?")  # ZIP or ZIP+4
_POSTCODE_SEPARATORS = re.compile(r"[\s-]+")
_POSTCODE = re.compile(r"[a-z0-9]+")
# Latin letters that Unicode decomposition does not reduce to a-z (casefold already
# turns "ß" into "ss"); \u0131 is the dotless i of Turkish.
_LATIN_LETTERS_WITHOUT_DECOMPOSITION = str.maketrans(
    {"ø": "o", "æ": "ae", "œ": "oe", "ł": "l", "đ": "d", "ð": "d", "þ": "th", "\u0131": "i"}
)
_US_STATES = {
    "alabama": "al", "alaska": "ak", "arizona": "az", "arkansas": "ar", "california": "ca",
    "colorado": "co", "connecticut": "ct", "delaware": "de", "districtofcolumbia": "dc",
    "florida": "fl", "georgia": "ga", "hawaii": "hi", "idaho": "id", "illinois": "il",
    "indiana": "in", "iowa": "ia", "kansas": "ks", "kentucky": "ky", "louisiana": "la",
    "maine": "me", "maryland": "md", "massachusetts": "ma", "michigan": "mi",
    "minnesota": "mn", "mississippi": "ms", "missouri": "mo", "montana": "mt",
    "nebraska": "ne", "nevada": "nv", "newhampshire": "nh", "newjersey": "nj",
    "newmexico": "nm", "newyork": "ny", "northcarolina": "nc", "northdakota": "nd",
    "ohio": "oh", "oklahoma": "ok", "oregon": "or", "pennsylvania": "pa",
    "rhodeisland": "ri", "southcarolina": "sc", "southdakota": "sd", "tennessee": "tn",
    "texas": "tx", "utah": "ut", "vermont": "vt", "virginia": "va", "washington": "wa",
    "westvirginia": "wv", "wisconsin": "wi", "wyoming": "wy", "americansamoa": "as",
    "guam": "gu", "northernmarianaislands": "mp", "puertorico": "pr",
    "unitedstatesvirginislands": "vi", "usvirginislands": "vi",
}  # fmt: skip


def sha256_hex(value: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 bytes; "" stays "" (a missing value is sent
    empty: the hash of nothing would look like data)."""
    return hashlib.sha256(value.encode()).hexdigest() if value else ""


def normalize_email(value: object) -> str:
    """Meta: "Trim leading and trailing white space, and convert all characters to
    lowercase". Text that is no email (not exactly one '@' with text on both sides, or
    a space inside) is ""."""
    email = _text(value).lower()
    local, _, domain = email.partition("@")
    if not local or not domain or "@" in domain or any(ch.isspace() for ch in email):
        return ""
    return email


def normalize_google_email(value: object) -> str:
    """Google: lowercased, and for gmail.com and googlemail.com the dots and any
    '+suffix' removed from the part before the '@', as Gmail itself ignores them
    ("cloudy.sanfrancisco+shopping@gmail.com" -> "cloudysanfrancisco@gmail.com").
    Other domains keep theirs."""
    email = normalize_email(value)
    local, _, domain = email.partition("@")
    if domain not in _GOOGLE_MAIL_DOMAINS:
        return email
    local = local.partition("+")[0].replace(".", "")
    return f"{local}@{domain}" if local else ""


def normalize_phone(value: object, region: str | None) -> str:
    """E.164 with its '+' ("+79123456789"), or "" when the text is no valid number.

    A number written without its country code is read as dialled in `region` (alpha-2),
    so "8 (912) 345-67-89" in RU drops the trunk prefix 8. An extension is not part of
    the E.164 number and is dropped. Validity, not just a plausible length, is required:
    a local "555-1234" with no area code would become a number nobody has.
    """
    text = _text(value)
    if not text:
        return ""
    try:
        number = phonenumbers.parse(text, region.upper() if region else None)
    except phonenumbers.NumberParseException:
        return ""
    if not phonenumbers.is_valid_number(number):
        return ""
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164)


def normalize_name(value: object) -> str:
    """Meta FN and LN: lowercase letters only, of any script.

    Meta: "Use a-z only. Lowercase only, no punctuation. Special characters in UTF-8
    format", and "Only First name (FN) and Last Name (LN) support special characters and
    non-Roman alphabets"; its own examples hash "valéry" and "정" as written. So accents
    and scripts stay, while punctuation, spaces and digits go ("Анна-Мария" ->
    "аннамария", "Mary Ann" -> "maryann", as Meta's SDK does for these keys).
    """
    return "".join(ch for ch in _lowercase(value) if _is_letter(ch))


def normalize_google_name(value: object) -> str:
    """Google first and last names: lowercase, "with no punctuation, no leading or
    trailing whitespace" (Data Manager AddressInfo reference). Letters of any script
    stay (Google's own template uploads "zoë", "pérez"), anything else but spaces goes,
    and runs of inner spaces become one ("remove any extra spaces before, after, and in
    between", Google Ads API)."""
    name = "".join(ch for ch in _lowercase(value) if _is_letter(ch) or ch.isspace())
    return " ".join(name.split())


def normalize_city(value: object) -> str:
    """Meta CT: "Use a-z only. Lowercase only, with no punctuation, no special
    characters, and no white space" ("São Paulo" -> "saopaulo"). A city in another
    script has no a-z form to give, so it is "" ("Москва")."""
    return _roman_letters(value)


def normalize_state(value: object) -> str:
    """Meta ST: "the 2-character ANSI abbreviation code, lowercase" for US states (full
    names are mapped: "New York" -> "ny"); other states "in lowercase, with no
    punctuation, no special characters, and no white space"."""
    state = _roman_letters(value)
    return _US_STATES.get(state, state)


def normalize_zip(value: object, country: str | None) -> str:
    """Meta ZIP: "Use lowercase, and no white space. For the US, use only the first 5
    digits". `country` (alpha-2) is where the lead lives, or the default region.

    A US value that is no 5-digit ZIP or ZIP+4 is "" rather than cut to shape: "2134"
    written for "02134" lost its zero already. Elsewhere spaces and dashes go (the
    Conversions API rule: "no spaces and no dash"); anything else but a-z and 0-9 left
    means the value is no postcode ("n/a").
    """
    text = _text(value).lower()
    if (country or "").lower() == "us":
        us_zip = _US_ZIP.fullmatch(text)
        return us_zip.group(1) if us_zip else ""
    postcode = _POSTCODE_SEPARATORS.sub("", text)
    return postcode if _POSTCODE.fullmatch(postcode) else ""


def normalize_country(value: object) -> str:
    """Lowercase ISO 3166-1 alpha-2 ("US" -> "us"), or "". Names ("Russia") and
    look-alikes ("UK" for GB) are not mapped: exported empty rather than guessed."""
    code = _text(value).upper()
    return code.lower() if code in _COUNTRIES else ""


def meta_row(traits: Mapping[str, object], default_region: str | None) -> list[str]:
    """One lead as a row of a Meta multi-key payload: SHA-256 hex (or "") per
    META_SCHEMA column."""
    return _meta_row(traits, *_whereabouts(traits, default_region))


def google_row(traits: Mapping[str, object], default_region: str | None) -> list[str]:
    """One lead as a row of a Customer Match CSV under GOOGLE_HEADER: email, phone and
    names hashed (phone E.164 with its '+', unlike Meta), Country and Zip in clear."""
    return _google_row(traits, *_whereabouts(traits, default_region))


def both_rows(
    traits: Mapping[str, object], default_region: str | None
) -> tuple[list[str], list[str]]:
    """The lead's Meta row and Google row, its phone number read once for both."""
    whereabouts = _whereabouts(traits, default_region)
    return _meta_row(traits, *whereabouts), _google_row(traits, *whereabouts)


def _whereabouts(
    traits: Mapping[str, object], default_region: str | None
) -> tuple[str, str | None, str]:
    """The lead's country, the region its local formats are read in (its own country's,
    else the default), and its phone number in E.164."""
    country = normalize_country(traits.get("country"))
    region = country or default_region
    return country, region, normalize_phone(traits.get("phone"), region)


def _meta_row(
    traits: Mapping[str, object], country: str, region: str | None, phone: str
) -> list[str]:
    normalized = (
        normalize_email(traits.get("email")),
        # Meta PHONE: "Remove symbols, letters, and any leading zeroes", with the country
        # code: E.164 without its '+'.
        phone.removeprefix("+"),
        normalize_name(traits.get("first_name")),
        normalize_name(traits.get("last_name")),
        normalize_city(traits.get("city")),
        normalize_state(traits.get("state")),
        normalize_zip(traits.get("zip"), region),
        country,
    )
    return [sha256_hex(value) for value in normalized]


def _google_row(
    traits: Mapping[str, object], country: str, region: str | None, phone: str
) -> list[str]:
    return [
        sha256_hex(normalize_google_email(traits.get("email"))),
        sha256_hex(phone),
        sha256_hex(normalize_google_name(traits.get("first_name"))),
        sha256_hex(normalize_google_name(traits.get("last_name"))),
        # Region codes are conventionally upper case; Google's own formatter writes them so.
        country.upper(),
        # In clear, as the lead wrote it: Google's own formatter only trims it.
        _text(traits.get("zip")),
    ]


def _text(value: object) -> str:
    """The trimmed text of a trait, or "" for anything but a string.

    A number is refused, not converted: as a JSON number a phone has lost its '+' and a
    zip its leading zero, and guessing them back could match the wrong person.
    """
    return value.strip() if isinstance(value, str) else ""


def _lowercase(value: object) -> str:
    # Composed (NFC) so that "José" typed with a combining accent hashes like "José".
    return unicodedata.normalize("NFC", _text(value).lower())


def _is_letter(ch: str) -> bool:
    # Marks too: the vowel signs of Devanagari or Thai are part of the letters they sit on.
    return unicodedata.category(ch)[0] in "LM"


def _roman_letters(value: object) -> str:
    """a-z only: accents removed ("é" -> "e"), anything else dropped."""
    decomposed = unicodedata.normalize("NFKD", _text(value).casefold())
    folded = decomposed.translate(_LATIN_LETTERS_WITHOUT_DECOMPOSITION)
    return "".join(ch for ch in folded if "a" <= ch <= "z")
