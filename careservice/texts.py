"""Jinja2 texts: mail templates under templates/mail/, pages under templates/web/, per-site overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined, Template, select_autoescape


class Texts:
    """Renders `<kind>/<site id>/<name>` when the site has its own version, else `<kind>/<name>`."""

    def __init__(self, templates_dir: Path) -> None:
        self._env = Environment(
            loader=FileSystemLoader(templates_dir), autoescape=select_autoescape(["html"]),
            undefined=StrictUndefined, keep_trailing_newline=True, auto_reload=False,
        )
        self._chosen: dict[tuple[str, str, str], Template] = {}

    def _render(self, kind: str, site_id: str, name: str, values: dict[str, Any]) -> str:
        key = (kind, site_id, name)
        if key not in self._chosen:  # the file lookup, including the miss for a site without its own, once
            self._chosen[key] = self._env.select_template([f"{kind}/{site_id}/{name}", f"{kind}/{name}"])
        return self._chosen[key].render(**values)

    def mail(self, site_id: str, name: str, **values: Any) -> tuple[str, str]:
        """(subject, body) of mail template `name`; its first line is `Subject: ...`."""
        first, _, body = self._render("mail", site_id, f"{name}.txt", values).partition("\n")
        return first.removeprefix("Subject:").strip(), body

    def page(self, site_id: str, name: str, **values: Any) -> str:
        return self._render("web", site_id, f"{name}.html", values)
