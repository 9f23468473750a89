"""Plain text derived from an email's HTML."""

from __future__ import annotations

from channels.email.text import html_to_text


def test_paragraphs_and_line_breaks_are_kept() -> None:
    html = "<p>First\n   paragraph</p><p>Marta<br>Door advisor</p>"
    assert html_to_text(html) == "First paragraph\n\nMarta\nDoor advisor\n"


def test_links_are_written_as_text_then_url() -> None:
    html = '<p><a href="https://a.example/x">Open it</a> or <a href="https://b.example">https://b.example</a></p>'
    assert html_to_text(html) == "Open it (https://a.example/x) or https://b.example\n"


def test_scripts_styles_head_and_hidden_preheaders_are_dropped() -> None:
    html = (
        "<html><head><title>T</title><style>p{color:red}</style></head><body>"
        '<div style="display: none">preview line&#847;&zwnj;&nbsp;</div>'
        "<script>alert(1)</script><p>Visible</p></body></html>"
    )
    assert html_to_text(html) == "Visible\n"


def test_list_items_each_start_a_line() -> None:
    assert html_to_text("<ul><li>one</li>\n  <li>two</li></ul>") == "- one\n- two\n"
