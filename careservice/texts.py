"""Jinja2 texts: mail templates under mail/, pages under web/, per-site overrides.

The defaults ship inside the package (the repository's top-level templates/ becomes
careservice/templates in the wheel). `service.templates_dir`, when set, is searched first, so an
operator overrides one file without copying the rest: for each name the order is the override's
`<kind>/<site id>/<name>`, the package's `<kind>/<site id>/<name>`, the override's `<kind>/<name>`,
the package's `<kind>/<name>`.
"""

from __future__ import annotations

import importlib.util
from collections import defaultdict
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
from careservice.model import ContactDetails

MAIL_TEMPLATES = ("ack", "answer", "forward", "note", "notice", "reminder", "digest")
PAGE_TEMPLATES = ("form", "thanks")


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


class Texts:
    """Renders `<kind>/<site id>/<name>` when the site has its own version, else `<kind>/<name>`."""

    def __init__(self, override_dir: Path | None = None) -> None:
        loaders: list[BaseLoader] = [FileSystemLoader(packaged_templates())]
        if override_dir is not None:
            loaders.insert(0, FileSystemLoader(override_dir))
        self._env = Environment(
            loader=ChoiceLoader(loaders), autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined, keep_trailing_newline=True, auto_reload=False,
        )
        self._chosen: dict[tuple[str, str, str], Template] = {}

    def _template(self, kind: str, site_id: str, name: str) -> Template:
        key = (kind, site_id, name)
        if key not in self._chosen:  # the file lookup, including the miss for a site without its own, once
            try:
                self._chosen[key] = self._env.select_template([f"{kind}/{site_id}/{name}", f"{kind}/{name}"])
            except TemplateNotFound:
                raise TemplateProblem(f"{kind}/{name}", "not found") from None
            except TemplateSyntaxError as exc:
                raise TemplateProblem(exc.name or f"{kind}/{name}", f"line {exc.lineno}: {exc.message}") from None
        return self._chosen[key]

    def _render(self, kind: str, site_id: str, name: str, values: dict[str, Any]) -> str:
        return self._template(kind, site_id, name).render(**values)

    def mail(self, site_id: str, name: str, **values: Any) -> tuple[str, str]:
        """(subject, body) of mail template `name`; its first line is `Subject: ...`."""
        first, _, body = self._render("mail", site_id, f"{name}.txt", values).partition("\n")
        return first.removeprefix("Subject:").strip(), body

    def page(self, site_id: str, name: str, **values: Any) -> str:
        return self._render("web", site_id, f"{name}.html", values)

    def check(self, site: Site) -> list[TemplateProblem]:
        """Render every mail and page template for `site` with sample values; the problems found."""
        problems = []
        for kind, names, suffix in (("mail", MAIL_TEMPLATES, ".txt"), ("web", PAGE_TEMPLATES, ".html")):
            for name in names:
                path = f"{kind}/{name}{suffix}"
                try:
                    template = self._template(kind, site.id, name + suffix)
                    path = template.name or path
                    text = template.render(**sample_values(kind, name, site))
                except TemplateProblem as exc:
                    problems.append(exc)
                    continue
                except TemplateSyntaxError as exc:  # in a template this one extends or includes
                    problems.append(TemplateProblem(exc.name or path, f"line {exc.lineno}: {exc.message}"))
                    continue
                except (TemplateError, UnicodeError, OSError) as exc:
                    problems.append(TemplateProblem(path, f"{type(exc).__name__}: {exc}"))
                    continue
                if kind == "mail" and not text.startswith("Subject:"):
                    problems.append(TemplateProblem(path, 'the first line must be "Subject: ..."'))
        return problems


def sample_values(kind: str, name: str, site: Site) -> dict[str, Any]:
    """What the stages and the form pass to each template, with made-up values."""
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
