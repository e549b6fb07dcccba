"""Jinja2 texts: mail templates under mail/, pages under web/, per language and per site.

The defaults ship inside the package (the repository's top-level templates/ becomes
careservice/templates in the wheel). Each text lives in a language folder, `<kind>/<language>/<name>`,
and a site may have its own version in `<kind>/<language>/<site id>/<name>`. `service.templates_dir`,
when set, is searched first, so an operator overrides one file without copying the rest. For each
language in turn (the one asked for, then the site's default language, then "en") the order is the
override's per-site file, the package's per-site file, the override's file, the package's file.
Shared page markup without words lives in `web/layout/`.
"""

from __future__ import annotations

import importlib.util
import re
import tomllib
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from jinja2 import (
    BaseLoader,
    ChoiceLoader,
    Environment,
    FileSystemLoader,
    StrictUndefined,
    Template,
    TemplateError,
    TemplateNotFound,
    TemplateSyntaxError,
    select_autoescape,
)

from careservice.config import Site
from careservice.language import LANGUAGE
from careservice.model import ContactDetails

# The automatic notices to staff: mail/<language>/notices/<key>.txt holds one's words, its Subject line the
# headline and each paragraph below on one line (the frame, notice.txt, wraps them). A key is the reason code
# of the outcome that sends it, or what it reports; a stage passes it with the values its text takes.
NOTICE_FOLDER = "notices/"
NOTICES = ("reply_not_from_staff", "reply_unauthenticated", "reply_token_invalid", "reply_late", "reply_other_staff",
           "reply_not_case_staff", "reply_token_stale", "reply_unreadable", "reply_attached_mail",
           "reply_address_attached", "reply_empty", "no_customer_address", "answered", "closed",
           "reply_unknown_command", "help", "note_empty", "note_nobody", "assign_unknown", "assigned",
           "answer_failed", "expired")
MAIL_TEMPLATES = ("ack", "answer", "forward", "note", "notice", "reminder", "digest",
                  *(f"{NOTICE_FOLDER}{key}" for key in NOTICES))
PAGE_TEMPLATES = ("form", "thanks")
FALLBACK_LANGUAGE = "en"
SHARED_FOLDERS = {"layout"}  # web/layout/: markup the language folders' pages extend
# a run of reply and forward prefixes ("Re: AW: Fwd:", "RE[2]:", French "RE :"), alone or after our "[...]" tag
_PREFIX = r"(re|aw|sv|antw|fwd?|wg)(?:\s*\[\d{1,4}\])?\s*:\s*"
_PREFIXES = re.compile(rf"^(\[[^\]]{{0,200}}\]\s*)?{_PREFIX}(?:{_PREFIX})*", re.IGNORECASE)
_FORWARDED = {"fw", "fwd", "wg"}


class TemplateProblem(Exception):
    """A template that is missing or does not render; `path` is relative to the templates directory."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = path
        self.log_detail = f"template={path}"  # a file name, never mail content: safe for the log


def packaged_templates() -> Path:
    """The default templates: careservice/templates in a wheel, the repository's templates/ in a checkout."""
    spec = importlib.util.find_spec("careservice.templates")
    if spec is None or not spec.submodule_search_locations:
        raise TemplateProblem(".", "the packaged templates are missing from this installation")
    return Path(list(spec.submodule_search_locations)[0])


def one_prefix(subject: str) -> str:
    """`subject` with a run of "Re:"/"AW:"/"Fwd:"/"SV:" prefixes made one ("Re: " or "Fwd: "), so that
    answers and forwards of replies never pile them up."""
    def canonical(m: re.Match[str]) -> str:
        return (m.group(1) or "") + ("Fwd: " if m.group(2).lower() in _FORWARDED else "Re: ")
    return _PREFIXES.sub(canonical, subject, count=1)


def separated(text: str) -> str:
    """`text` with a bare "--" line, as clients and line trimming leave RFC 3676's signature separator,
    given its space back: "-- "."""
    return "\n".join("-- " if line.rstrip() == "--" else line for line in text.split("\n"))


def signed(text: str, signature: str) -> str:
    """`text` with the team `signature` once: not added again when the staff member's own signature
    already holds it, added inside their signature block when they have one, else after "-- "."""
    text = separated(text)
    if " ".join(signature.split()).casefold() in " ".join(text.split()).casefold():
        return text
    if "-- " in text.split("\n"):
        return f"{text}\n{signature}"
    return f"{text}\n\n-- \n{signature}"


class Texts:
    """Renders the texts of each site in each language, falling back file by file (see the module)."""

    def __init__(self, override_dir: Path | None = None, sites: Iterable[Site] = ()) -> None:
        self._roots = [packaged_templates()]
        if override_dir is not None:
            self._roots.insert(0, override_dir)
        loaders: list[BaseLoader] = [FileSystemLoader(root) for root in self._roots]
        self._env = Environment(
            loader=ChoiceLoader(loaders), autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined, keep_trailing_newline=True, auto_reload=False,
        )
        self._env.filters["signed"] = signed
        self._defaults = {site.id: site.language for site in sites}
        self._chosen: dict[tuple[str, str, str, str], Template] = {}
        self._words: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._languages: frozenset[str] | None = None

    @property
    def languages(self) -> frozenset[str]:
        """The languages with a folder of texts, packaged or overridden."""
        if self._languages is None:
            self._languages = frozenset(folder.name for root in self._roots for kind in ("mail", "web")
                                        if (root / kind).is_dir() for folder in (root / kind).iterdir()
                                        if folder.is_dir() and self._is_language(folder.name))
        return self._languages

    def _is_language(self, folder: str) -> bool:
        """A language folder's name; a site id ("ixs") is not one: that is a per-site folder out of place."""
        return bool(LANGUAGE.fullmatch(folder)) and folder not in self._defaults

    def choose(self, wanted: Iterable[str]) -> str:
        """The first of `wanted` (language tags, best first) that has texts; "" for none."""
        return next((tag for tag in wanted if tag in self.languages), "")

    def stray(self) -> list[str]:
        """Files of the override directory that no lookup reaches: outside `<kind>/<language>/`."""
        found = []
        for root in self._roots[:-1]:  # the override, if any: the package's own layout is tested
            for kind in ("mail", "web"):
                for path in sorted((root / kind).rglob("*")) if (root / kind).is_dir() else ():
                    parts = path.relative_to(root / kind).parts
                    if path.is_file() and (len(parts) == 1 or not (self._is_language(parts[0])
                                                                   or parts[0] in SHARED_FOLDERS)):
                        found.append("/".join((kind, *parts)))
        return found

    def _names(self, kind: str, site_id: str, name: str, language: str) -> list[str]:
        """Where `name` may be, best first (see the module)."""
        order = dict.fromkeys(x for x in (language, self._defaults.get(site_id, ""), FALLBACK_LANGUAGE) if x)
        return [path for lang in order for path in (
            *((f"{kind}/{lang}/{site_id}/{name}",) if site_id else ()), f"{kind}/{lang}/{name}")]

    def page_words(self, site_id: str, name: str, language: str = "") -> dict[str, Any]:
        """A page's words, kept as data beside it (`web/<language>/<name>.toml`, found like a template; none
        for a page without one): its tables become the page's values."""
        key = (site_id, name, language)
        if key not in self._words:
            loader = self._env.loader
            assert loader is not None
            for path in self._names("web", site_id, f"{name}.toml", language):
                try:
                    source = loader.get_source(self._env, path)[0]
                except TemplateNotFound:
                    continue
                try:
                    self._words[key] = tomllib.loads(source)
                except tomllib.TOMLDecodeError as exc:
                    raise TemplateProblem(path, f"not valid TOML: {exc}") from None
                break
            else:
                self._words[key] = {}
        return self._words[key]

    def _template(self, kind: str, site_id: str, name: str, language: str) -> Template:
        key = (kind, site_id, name, language)
        if key not in self._chosen:  # the file lookup, including the misses before a fallback, once
            names = self._names(kind, site_id, name, language)
            try:
                self._chosen[key] = self._env.select_template(names)
            except TemplateNotFound:
                raise TemplateProblem(f"{kind}/{language or FALLBACK_LANGUAGE}/{name}", "not found") from None
            except TemplateSyntaxError as exc:
                raise TemplateProblem(exc.name or names[0], f"line {exc.lineno}: {exc.message}") from None
        return self._chosen[key]

    def mail(self, site_id: str, name: str, /, language: str = "", **values: Any) -> tuple[str, str]:
        """(subject, body) of mail template `name` in `language` ("" = the site's); its first line is
        `Subject: ...`. A notice's words (`notices/<key>`) come in the frame of every notice, notice.txt,
        as its headline (their subject) and explanation."""
        first, _, body = self._template("mail", site_id, f"{name}.txt", language).render(**values).partition("\n")
        subject = one_prefix(first.removeprefix("Subject:").strip())
        if name.startswith(NOTICE_FOLDER):
            return self.mail(site_id, "notice", language, site=values["site"], case_id=values["case_id"],
                             headline=subject, explanation=body.strip())
        return subject, body

    def page(self, site_id: str, name: str, language: str = "", **values: Any) -> str:
        words = self.page_words(site_id, name, language)
        return self._template("web", site_id, f"{name}.html", language).render(**words, **values)

    def check(self, site: Site) -> list[TemplateProblem]:
        """Render every mail and page template for `site` in every language with sample values; the problems."""
        problems = []
        for language in sorted(self.languages):
            for kind, names, suffix in (("mail", MAIL_TEMPLATES, ".txt"), ("web", PAGE_TEMPLATES, ".html")):
                for name in names:
                    problems.extend(self._check(site, language, kind, name, suffix))
        return list({str(p): p for p in problems}.values())  # a file two languages fall back to, once

    def _check(self, site: Site, language: str, kind: str, name: str, suffix: str) -> list[TemplateProblem]:
        path = f"{kind}/{language}/{name}{suffix}"
        try:
            template = self._template(kind, site.id, name + suffix, language)
            path = template.name or path
            words = self.page_words(site.id, name, language) if kind == "web" else {}
            text = template.render(**words, **sample_values(kind, name, site))
        except TemplateProblem as exc:
            return [exc]
        except TemplateSyntaxError as exc:  # in a template this one extends or includes
            return [TemplateProblem(exc.name or path, f"line {exc.lineno}: {exc.message}")]
        except (TemplateError, UnicodeError, OSError) as exc:
            return [TemplateProblem(path, f"{type(exc).__name__}: {exc}")]
        if kind == "mail" and not text.startswith("Subject:"):
            return [TemplateProblem(path, 'the first line must be "Subject: ..."')]
        if kind == "mail" and "--" in text.split("\n"):
            return [TemplateProblem(path, 'the signature separator is "-- ", with a space (RFC 3676)')]
        return []


_DONE_BY = {"name": "Sample Staff", "sender": "staff@example.org"}
# The values each notice's text takes besides `site` and `case_id` (what the stages pass to Context.notice)
NOTICE_VALUES: dict[str, dict[str, Any]] = {
    "answered": _DONE_BY,
    "closed": _DONE_BY,
    "assign_unknown": {"staff": ("staff@example.org", "other@example.org")},
    "assigned": {"owner": "other@example.org", "sender": "staff@example.org"},
    "answer_failed": {"code": "550", "gave_up_after": 0},
    "expired": {"days": 30},
}


def sample_values(kind: str, name: str, site: Site) -> dict[str, Any]:
    """What the stages and the form pass to each template, with made-up values."""
    if kind == "mail" and name.startswith(NOTICE_FOLDER):
        return {"site": site, "case_id": "0123456789ab", **NOTICE_VALUES.get(name.removeprefix(NOTICE_FOLDER), {})}
    contact = ContactDetails("Sample Customer", "customer@example.org", "1 Sample Street", "+1 555 0100", "",
                             "Sample Ltd", "telephone")
    if kind == "mail":
        return {
            "ack": {"site": site, "case_id": "0123456789ab", "contact": contact},
            "answer": {"site": site, "subject": "Sample subject", "text": "Sample answer."},
            "forward": {"site": site, "case_id": "0123456789ab", "subject": "Sample subject", "contact": contact,
                        "text": "Sample query.", "follow_up": False},
            "note": {"site": site, "case_id": "0123456789ab", "subject": "Sample subject",
                     "author": "staff@example.org", "text": "Sample note."},
            "reminder": {"site": site, "case_id": "0123456789ab", "age": "1 day 2 hours"},
            "notice": {"site": site, "case_id": "0123456789ab", "headline": "Sample headline",
                       "explanation": "Sample explanation."},
            "digest": {"site": site, "day": "2026-12-02", "cases": [
                {"id": "0123456789ab", "age": "1 day 2 hours", "owner": "",
                 "reply_address": f"{site.care_local}+0123456789ab.0a1b2c3d.aaaaaaaaaaaaaaaa@{site.domain}"}]},
        }[name]
    page = {"site": site, "nonce": "sample-nonce", "contact_url": site.contact_path}
    if name == "form":
        page.update(values={"preferred_contact": "email"}, errors={"email": "invalid"}, notice="", token="sample",
                    limits=defaultdict(lambda: 100), token_field="code_token", honeypot_field="website")
    return page
