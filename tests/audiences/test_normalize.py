"""Lead traits normalised and hashed as Meta and Google match them.

Expected hashes are literals, checked once by hand (`printf %s VALUE | sha256sum`);
where a platform's docs publish the hash of an example, that is the one used.
"""

from __future__ import annotations

import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from channels.audiences.normalize import (
    GOOGLE_HEADER,
    META_SCHEMA,
    google_row,
    meta_row,
    normalize_city,
    normalize_country,
    normalize_email,
    normalize_google_email,
    normalize_google_name,
    normalize_name,
    normalize_phone,
    normalize_state,
    normalize_zip,
    sha256_hex,
)

# Published by Meta (Custom Audiences "Hashing" and Conversions API customer information
# parameters) or Google (Data Manager formatting examples), keyed by normalised value.
MARY_EMAIL = "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79"
META_SAMPLE_PHONE = "1ef970831d7963307784fa8688e8fce101a15685d62aa765fed23f3a2c576a4e"
JOHN_SMITH_EMAIL = "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f"
PHONE_16505551212 = "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176"
NAME_MARY = "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec"
NAME_VALERY = "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c"
NAME_HANGUL = "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14"
COUNTRY_US = "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621"
CLOUDY_GMAIL = "223ebda6f6889b1494551ba902d9d381daf2f642bae055888e96343d53e9f9c4"
PHONE_PLUS_18005550100 = "fb4f73a6ec5fdb7077d564cdd22c3554b43ce49168550c3b12c547b78c517b30"
# Not published; checked by hand.
CITY_SANFRANCISCO = "1a6bd4d9d79dc0a79b53795c70d3349fa9e38968a3fbefbfe8783efb1d2b6aac"
STATE_CA = "6959097001d10501ac7d54c0bdb8db61420f658f2922cc26e46d536119a31126"
ZIP_94107 = "c884a209ebe08750a7d13db63bd02233b375bd79786cbe329ab11586cc35dead"
NAME_ANNAMARIA_CYRILLIC = "4f3ef27f1efd0ccfb9db803b0f231e57d65b2394edde62b8c3e5f34a971d1179"
PHONE_79123456789 = "dbae582ee1f37b15623829ece40b66a8eb5162337ab0a8b7cf1b86cb300391bc"
ZIP_941071234 = "c711389868997b7f3f747e95fbce358e2ac994a8b4e838142a4e968c2cfc8b22"
PHONE_PLUS_16505551212 = "1e231c66011e7a2d867a9cfae267a6aff103cf4913640b6e71a99850fc0ffbc8"

NOT_TEXT = [None, 42, 4.2, True, ["a"], {"a": "b"}, b"mary@example.com"]
TRAITS = ("email", "phone", "first_name", "last_name", "city", "state", "zip", "country")
ANY_TRAIT = st.one_of(
    st.text(), st.none(), st.integers(), st.floats(), st.booleans(), st.lists(st.text())
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mary@example.com", MARY_EMAIL),
        ("15559876543", META_SAMPLE_PHONE),
        ("john_smith@gmail.com", JOHN_SMITH_EMAIL),
        ("16505551212", PHONE_16505551212),
        ("mary", NAME_MARY),
        ("valéry", NAME_VALERY),
        ("정", NAME_HANGUL),
        ("us", COUNTRY_US),
        ("cloudysanfrancisco@gmail.com", CLOUDY_GMAIL),
        ("+18005550100", PHONE_PLUS_18005550100),
    ],
)
def test_sha256_hex_matches_the_platforms_published_hashes(value: str, expected: str) -> None:
    assert sha256_hex(value) == expected


def test_an_empty_value_is_exported_empty_not_hashed() -> None:
    assert sha256_hex("") == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("mary@example.com", "mary@example.com"),
        ("  Mary@Example.COM \n", "mary@example.com"),
        ("John_Smith@gmail.com", "john_smith@gmail.com"),
        # Meta keeps what Google strips from Gmail addresses.
        ("John.Smith+news@Gmail.com", "john.smith+news@gmail.com"),
    ],
)
def test_email_is_trimmed_and_lowercased(value: str, expected: str) -> None:
    assert normalize_email(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "   ", "mary", "mary@", "@example.com", "mary smith@example.com", "a@b@example.com"],
)
def test_text_that_is_not_an_email_is_empty(value: str) -> None:
    assert normalize_email(value) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cloudy.sanfrancisco+shopping@gmail.com", "cloudysanfrancisco@gmail.com"),
        (" Cloudy.SanFrancisco+Shopping@GMAIL.com ", "cloudysanfrancisco@gmail.com"),
        ("first.last+a+b@googlemail.com", "firstlast@googlemail.com"),
        ("user.name+NYC@Example.com", "user.name+nyc@example.com"),
        ("first.last@gmail.com.example", "first.last@gmail.com.example"),
    ],
)
def test_google_email_drops_dots_and_plus_suffix_only_for_gmail(value: str, expected: str) -> None:
    assert normalize_google_email(value) == expected


@pytest.mark.parametrize("value", ["+tag@gmail.com", "...@gmail.com", "a b@gmail.com"])
def test_gmail_address_with_nothing_left_before_the_at_is_empty(value: str) -> None:
    assert normalize_google_email(value) == ""


@pytest.mark.parametrize(
    ("value", "region", "expected"),
    [
        ("(650)555-1212", "US", "+16505551212"),
        ("650.253.0000", "us", "+16502530000"),
        ("+1 (800) 555-0100", None, "+18005550100"),
        ("+1 650-253-0000 ext. 123", None, "+16502530000"),
        ("020 7946 0018", "GB", "+442079460018"),
        ("+44 20 7946 0958", "DE", "+442079460958"),
        ("030 901820", "DE", "+4930901820"),
        ("0049 30 901820", "DE", "+4930901820"),
        ("8 (912) 345-67-89", "RU", "+79123456789"),
        ("+7 912 345-67-89", None, "+79123456789"),
        ("+7 (912) 345-67-89 доб. 12", "RU", "+79123456789"),
        ("98765 43210", "IN", "+919876543210"),
        ("+91 98765 43210", "US", "+919876543210"),
    ],
)
def test_phone_becomes_e164_read_in_the_leads_region(
    value: str, region: str | None, expected: str
) -> None:
    assert normalize_phone(value, region) == expected


@pytest.mark.parametrize(
    ("value", "region"),
    [
        ("call me", "US"),
        ("", "US"),
        # A national number with no region to read it in.
        ("(650) 253-0000", None),
        ("8 (912) 345-67-89", "Russia"),
        # Possible lengths, but no number anyone has.
        ("555-1234", "US"),
        ("+1 111 111 1111", None),
        ("1" * 300, "US"),
    ],
)
def test_phone_that_is_not_a_valid_number_is_empty(value: str, region: str | None) -> None:
    assert normalize_phone(value, region) == ""


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mary", "mary"),
        ("  Valéry ", "valéry"),
        ("정", "정"),
        ("José", "josé"),
        ("Jose\u0301", "josé"),  # a combining accent hashes like the composed letter
        ("Анна-Мария", "аннамария"),
        ("Σοφία", "σοφία"),
        ("O'Brien", "obrien"),
        ("Mary Ann", "maryann"),
        ("J.R.R.", "jrr"),
        ("123", ""),
    ],
)
def test_meta_name_keeps_letters_of_any_script_lowercased(value: str, expected: str) -> None:
    assert normalize_name(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mary", NAME_MARY),
        ("Valéry", NAME_VALERY),
        ("정", NAME_HANGUL),
        ("Анна-Мария", NAME_ANNAMARIA_CYRILLIC),
    ],
)
def test_meta_name_hashes_match_the_hand_checked_values(value: str, expected: str) -> None:
    assert sha256_hex(normalize_name(value)) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("Mary", "mary"),
        ("  Mary   Ann  ", "mary ann"),
        ("Анна-Мария", "аннамария"),
        ("O'Brien", "obrien"),
        ("Zoë", "zoë"),
        ("Pérez", "pérez"),
        ("Σοφία", "σοφία"),
    ],
)
def test_google_name_is_lowercased_without_punctuation_or_extra_spaces(
    value: str, expected: str
) -> None:
    assert normalize_google_name(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("San Francisco", "sanfrancisco"),
        ("St. Louis", "stlouis"),
        ("Winston-Salem", "winstonsalem"),
        ("São Paulo", "saopaulo"),
        ("Tromsø", "tromso"),
        ("Москва", ""),
    ],
)
def test_city_is_a_to_z_only(value: str, expected: str) -> None:
    assert normalize_city(value) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("CA", "ca"),
        ("California", "ca"),
        ("new york", "ny"),
        ("N.Y.", "ny"),
        ("District of Columbia", "dc"),
        ("New South Wales", "newsouthwales"),
        ("Île-de-France", "iledefrance"),
    ],
)
def test_state_is_the_us_code_or_the_name_without_punctuation(value: str, expected: str) -> None:
    assert normalize_state(value) == expected


@pytest.mark.parametrize(
    ("value", "country", "expected"),
    [
        ("94107", "us", "94107"),
        ("94107-1234", "us", "94107"),
        (" 941071234 ", "US", "94107"),
        ("9410", "us", ""),
        ("SW1A 1AA", "gb", "sw1a1aa"),
        ("10115", "de", "10115"),
        ("01310-100", "br", "01310100"),
        ("n/a", "gb", ""),
        ("94107-1234", None, "941071234"),
    ],
)
def test_zip_is_lowercase_without_spaces_and_us_keeps_five_digits(
    value: str, country: str | None, expected: str
) -> None:
    assert normalize_zip(value, country) == expected


@pytest.mark.parametrize(
    ("value", "expected"),
    [("US", "us"), (" ru ", "ru"), ("gb", "gb"), ("Russia", ""), ("UK", ""), ("USA", ""), ("", "")],
)
def test_country_is_a_lowercase_iso_code_never_a_mapped_name(value: str, expected: str) -> None:
    assert normalize_country(value) == expected


@pytest.mark.parametrize("value", NOT_TEXT)
def test_a_trait_that_is_not_text_is_empty_for_every_field(value: object) -> None:
    assert normalize_email(value) == ""
    assert normalize_google_email(value) == ""
    assert normalize_phone(value, "US") == ""
    assert normalize_name(value) == ""
    assert normalize_google_name(value) == ""
    assert normalize_city(value) == ""
    assert normalize_state(value) == ""
    assert normalize_zip(value, "us") == ""
    assert normalize_country(value) == ""


LEAD = {
    "email": " Mary@Example.com ",
    "phone": "(650)555-1212",
    "first_name": "Mary",
    "last_name": "Valéry",
    "city": "San Francisco",
    "state": "California",
    "zip": "94107-1234",
    "country": "US",
}


def test_meta_row_hashes_each_trait_in_schema_order() -> None:
    assert META_SCHEMA == ("EMAIL", "PHONE", "FN", "LN", "CT", "ST", "ZIP", "COUNTRY")
    assert meta_row(LEAD, None) == [
        MARY_EMAIL,
        PHONE_16505551212,
        NAME_MARY,
        NAME_VALERY,
        CITY_SANFRANCISCO,
        STATE_CA,
        ZIP_94107,
        COUNTRY_US,
    ]


def test_meta_row_leaves_missing_and_unusable_traits_empty() -> None:
    traits = {"email": "mary@example.com", "phone": "call me", "first_name": ["Mary"]}
    assert meta_row(traits, "US") == [MARY_EMAIL, "", "", "", "", "", "", ""]
    assert meta_row({}, "US") == [""] * len(META_SCHEMA)


def test_meta_row_reads_phone_and_zip_in_the_leads_country_before_the_default() -> None:
    row = meta_row({"phone": "8 (912) 345-67-89", "country": "ru", "zip": "94107-1234"}, "US")
    assert row[1] == PHONE_79123456789
    assert row[6] == ZIP_941071234


def test_meta_row_falls_back_to_the_default_region_when_the_country_is_not_a_code() -> None:
    row = meta_row({"phone": "(650)555-1212", "country": "United States", "zip": "94107"}, "US")
    assert row[1] == PHONE_16505551212
    assert row[6] == ZIP_94107
    assert row[7] == ""


def test_google_row_hashes_contact_traits_and_keeps_country_and_zip_in_clear() -> None:
    assert GOOGLE_HEADER == ("Email", "Phone", "First Name", "Last Name", "Country", "Zip")
    traits = {
        "email": "Cloudy.SanFrancisco+shopping@gmail.com",
        "phone": "(800)555-0100",
        "first_name": "Mary",
        "last_name": "Valéry",
        "country": "us",
        "zip": " 94107-1234 ",
    }
    assert google_row(traits, None) == [
        CLOUDY_GMAIL,
        PHONE_PLUS_18005550100,
        NAME_MARY,
        NAME_VALERY,
        "US",
        "94107-1234",
    ]


def test_google_row_leaves_missing_and_unusable_traits_empty() -> None:
    traits = {"email": "not an email", "phone": 16505551212, "country": "Russia", "zip": None}
    assert google_row(traits, "US") == ["", "", "", "", "", ""]


def test_the_same_phone_is_hashed_with_plus_for_google_and_without_for_meta() -> None:
    traits = {"phone": "(650)555-1212", "country": "US"}
    assert meta_row(traits, None)[1] == PHONE_16505551212
    assert google_row(traits, None)[1] == PHONE_PLUS_16505551212


@settings(max_examples=300, deadline=None)
@given(
    traits=st.dictionaries(st.sampled_from(TRAITS), ANY_TRAIT),
    default_region=st.sampled_from([None, "", "US", "ru", "Russia"]),
)
def test_rows_never_raise_and_fill_every_column(
    traits: dict[str, object], default_region: str | None
) -> None:
    meta = meta_row(traits, default_region)
    assert len(meta) == len(META_SCHEMA)
    assert all(value == "" or re.fullmatch("[0-9a-f]{64}", value) for value in meta)
    assert len(google_row(traits, default_region)) == len(GOOGLE_HEADER)
