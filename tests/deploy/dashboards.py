"""The PromQL of the shipped Grafana dashboards, and its form for a bare Prometheus."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
DASHBOARDS_DIR = REPO / "docker" / "grafana" / "dashboards"


@dataclass(frozen=True)
class Query:
    dashboard: str
    panel: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.panel}: {self.expr}"


def dashboards() -> dict[str, dict]:
    """Every shipped dashboard, by file name."""
    return {path.name: json.loads(path.read_text()) for path in sorted(DASHBOARDS_DIR.glob("*.json"))}


def panels(dashboard: dict) -> list[dict]:
    """All panels, the ones inside rows included (a collapsed row keeps its panels in its own list)."""
    found = []
    for panel in dashboard.get("panels", []):
        found.append(panel)
        found.extend(panel.get("panels", []))
    return found


def dashboard_queries() -> list[Query]:
    return [
        Query(board["title"], panel["title"], target["expr"])
        for board in dashboards().values()
        for panel in panels(board)
        for target in panel.get("targets", [])
    ]


def evaluable(expr: str, rate_interval: str = "30s") -> str:
    """`expr` with Grafana's variables replaced as Prometheus alone can run it: every model
    (the variable's "All", whose value is `.*`) and a fixed window for `$__rate_interval`."""
    substituted = expr.replace("$__rate_interval", rate_interval).replace("$model_name", ".*")
    if "$" in substituted:
        raise ValueError(f"a Grafana variable this function does not know is left in {substituted!r}")
    return substituted
