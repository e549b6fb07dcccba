"""Staff replies as the named mail clients build them when staff press Reply on a forward.

Each client puts the quote of the forward somewhere else and marks it its own way: Outlook sends
HTML with a `divRplyFwdMsg` header block and no `>` quoting (its text part has the same block);
Gmail a `gmail_quote` div and a text part with `>` quotes under "On ... wrote:"; Thunderbird text
with `>` quotes, top- or bottom-posted; the iPhone a `blockquote type="cite"`, "Sent from my iPhone"
and a text part with `>` quotes. `answer` is the staff member's own text, paragraphs separated by
blank lines; `html` (when given) is its HTML as the client's editor wrote it.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from email import policy
from email.message import EmailMessage
from email.utils import formatdate
from html import escape

from tests.support import STAFF

DATE = "Mon, 3 Mar 2025 at 10:12"
STAFF_IP = "192.0.2.55"  # in the Received line of every reply: it must never reach a customer


def forward_lines(forward: EmailMessage) -> list[str]:
    return forward.get_body(("plain",)).get_content().splitlines()


def _shown_from(forward: EmailMessage) -> tuple[str, str]:
    address = forward["From"].addresses[0]
    return address.display_name, address.addr_spec


def reply_headers(forward: EmailMessage, sender: str) -> EmailMessage:
    """The headers a client writes on Reply (its own Received line names the staff member's IP)."""
    msg = EmailMessage()
    msg["From"] = f"Agent Smith <{sender}>"
    msg["To"] = str(forward["Reply-To"])
    msg["Subject"] = "Re: " + str(forward["Subject"])
    msg["Date"] = formatdate(localtime=True)
    msg["In-Reply-To"] = str(forward["Message-ID"])
    msg["References"] = str(forward["Message-ID"])
    msg["Message-ID"] = f"<{base64.b32encode(os.urandom(10)).decode().lower()}@staff.example>"
    msg["Received"] = f"from [{STAFF_IP}] (helo=laptop) by mail.staff.example with ESMTPSA; " + formatdate()
    return msg


def _html_paragraphs(answer: str, attrs: str = "") -> str:
    """The answer as Outlook, Gmail and iOS write it: one div per line, an empty one between paragraphs."""
    return "".join(f"<div{attrs}>{escape(line) if line else '<br>'}</div>\n" for line in answer.splitlines())


def _quoted(forward: EmailMessage) -> str:
    return "\n".join(f"> {line}" if line else ">" for line in forward_lines(forward))


def _html_forward(forward: EmailMessage) -> str:
    return "<br>\n".join(escape(line) for line in forward_lines(forward))


def _send(msg: EmailMessage, text: str | None, html: str | None) -> bytes:
    if text is not None:
        msg.set_content(text)
        if html is not None:
            msg.add_alternative(html, subtype="html")
    else:
        assert html is not None
        msg.set_content(html, subtype="html")
    return msg.as_bytes(policy=policy.SMTP)


def outlook(forward: EmailMessage, answer: str, html: str = "", sender: str = STAFF, text_part: bool = True) -> bytes:
    """New Outlook / Outlook on the web: HTML (and a text part) with no `>` quoting at all."""
    name, address = _shown_from(forward)
    header = (f"From: {name} <{address}>\nSent: Monday, March 3, 2025 10:12\nTo: Agent Smith <{sender}>\n"
              f"Subject: {forward['Subject']}")
    body = html or _html_paragraphs(answer, attrs=' class="elementToProof" style="font-family: Aptos, sans-serif"')
    page = (
        '<html><head><meta http-equiv="Content-Type" content="text/html; charset=utf-8">'
        '<style type="text/css" style="display:none;"> P {margin-top:0;margin-bottom:0;} </style></head>\n'
        f'<body dir="ltr">\n{body}<div id="appendonsend"></div>\n'
        '<hr style="display:inline-block;width:98%" tabindex="-1">\n'
        '<div id="divRplyFwdMsg" dir="ltr"><font face="Calibri, sans-serif" style="font-size:11pt" color="#000000">'
        + "<br>\n".join(f"<b>{escape(k)}:</b>{escape(v)}" for k, v in (h.split(":", 1) for h in header.splitlines()))
        + '</font>\n<div>&nbsp;</div>\n</div>\n<div class="BodyFragment"><font size="2"><span style="font-size:11pt;">'
        f'\n<div class="PlainText">{_html_forward(forward)}</div>\n</span></font></div>\n</body>\n</html>\n'
    )
    text = f"{answer}\n\n{'_' * 32}\n{header}\n\n" + "\n".join(forward_lines(forward)) + "\n"
    return _send(reply_headers(forward, sender), text if text_part else None, page)


def gmail(forward: EmailMessage, answer: str, html: str = "", sender: str = STAFF) -> bytes:
    """Gmail: a `gmail_quote` div in the HTML; the text part quotes with `>` under a wrapped "On ... wrote:"."""
    name, address = _shown_from(forward)
    attribution = f"On {DATE}, {name} <{address}> wrote:"
    text = f"{answer}\n\nOn {DATE}, {name} <\n{address}> wrote:\n\n{_quoted(forward)}\n"
    page = (
        f'<div dir="ltr">{html or _html_paragraphs(answer)}</div><br>'
        '<div class="gmail_quote gmail_quote_container"><div dir="ltr" class="gmail_attr">'
        f"{escape(attribution)}<br></div>"
        '<blockquote class="gmail_quote" style="margin:0px 0px 0px 0.8ex;border-left:1px solid rgb(204,204,204);'
        f'padding-left:1ex">{_html_forward(forward)}</blockquote></div>\n'
    )
    return _send(reply_headers(forward, sender), text, page)


def thunderbird(forward: EmailMessage, answer: str, sender: str = STAFF, bottom: bool = False) -> bytes:
    """Thunderbird in plain-text mode: `>` quotes under "On ... wrote:", the answer above or below."""
    name, _ = _shown_from(forward)
    quote = f"On 03.03.25 10:12, {name} wrote:\n{_quoted(forward)}\n"
    return _send(reply_headers(forward, sender), f"{quote}\n{answer}\n" if bottom else f"{answer}\n\n{quote}", None)


def thunderbird_html(forward: EmailMessage, answer: str, sender: str = STAFF, bottom: bool = False) -> bytes:
    """Thunderbird in HTML mode (HTML only): `moz-cite-prefix` and `blockquote type="cite"`."""
    name, _ = _shown_from(forward)
    quoted = escape("\n".join(forward_lines(forward)))
    quote = (f'<div class="moz-cite-prefix">On 03.03.25 10:12, {escape(name)} wrote:<br></div>\n'
             f'<blockquote type="cite"><pre class="moz-quote-pre" wrap="">{quoted}</pre></blockquote>\n')
    own = "".join(f"<p>{'<br>'.join(map(escape, para.splitlines()))}</p>\n" for para in answer.split("\n\n") if para)
    page = f"<html><head></head><body>\n{quote + own if bottom else own + quote}</body></html>\n"
    return _send(reply_headers(forward, sender), None, page)


def iphone(forward: EmailMessage, answer: str, sender: str = STAFF) -> bytes:
    """iOS Mail: "Sent from my iPhone", the attribution quoted too, `blockquote type="cite"` in the HTML."""
    name, address = _shown_from(forward)
    attribution = f"On 3 Mar 2025, at 10:12, {name} <{address}> wrote:"
    text = f"{answer}\n\nSent from my iPhone\n\n> {attribution}\n>\n{_quoted(forward)}\n"
    page = (
        '<html><head><meta http-equiv="content-type" content="text/html; charset=utf-8"></head><body dir="auto">'
        f'{_html_paragraphs(answer, attrs=" dir=ltr")}<div dir="ltr"><br></div><div dir="ltr">Sent from my iPhone</div>'
        f'<div dir="ltr"><br><blockquote type="cite">{escape(attribution)}<br><br></blockquote></div>'
        f'<blockquote type="cite"><div dir="ltr">{_html_forward(forward)}</div></blockquote></body></html>\n'
    )
    return _send(reply_headers(forward, sender), text, page)


CLIENTS: dict[str, Callable[[EmailMessage, str], bytes]] = {
    "outlook": outlook,
    "outlook_html_only": lambda f, a: outlook(f, a, text_part=False),
    "gmail": gmail,
    "thunderbird": thunderbird,
    "thunderbird_bottom": lambda f, a: thunderbird(f, a, bottom=True),
    "thunderbird_html_bottom": lambda f, a: thunderbird_html(f, a, bottom=True),
    "iphone": iphone,
}
