"""deploy/: every variant renders offline, validates against the Kubernetes schemas, and
wires the relay and transceivers the way the contract says (issue 13)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner

from voicerelay.cli.main import cli

kubernetes_validate = pytest.importorskip("kubernetes_validate")

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
sys.path.insert(0, str(DEPLOY))
import render  # noqa: E402  (deploy/render.py, not a package)

VARIANTS = ["base", "overlays/eu-west", "overlays/us-east"]
KUBERNETES_VERSIONS = [f"1.{minor}.0" for minor in range(29, 38)]  # 1.29 to 1.37
DASHBOARD = DEPLOY / "grafana" / "voicerelay.json"

# The metric names of the issue-13 contract; histograms also expose _bucket, _sum, _count.
COUNTERS_AND_GAUGES = {
    "voicerelay_relay_packets_total",
    "voicerelay_relay_bytes_total",
    "voicerelay_relay_drops_total",
    "voicerelay_relay_flows",
    "voicerelay_relay_snapshot_age_seconds",
    "voicerelay_relay_snapshot_failures_total",
    "voicerelay_relay_worker_restarts_total",
    "voicerelay_relay_hops_total",
    "voicerelay_transceiver_sessions",
    "voicerelay_transceiver_sessions_created_total",
    "voicerelay_transceiver_sessions_closed_total",
    "voicerelay_transceiver_rtp_lost_total",
    "voicerelay_transceiver_draining",
}
HISTOGRAMS = {
    "voicerelay_transceiver_setup_seconds",
    "voicerelay_transceiver_jitter_seconds",
    "voicerelay_transceiver_rtt_seconds",
    "voicerelay_transceiver_agent_turn_seconds",
}
# Options the contract names that other engineers are adding (relay: --metrics,
# --cluster-routes; transceiver: --drain-grace, --ingress). Each is accepted here only while
# the CLI lacks it; once it exists, its variable must be the one the CLI reads.
CONTRACT_ENV = {
    "start": {"VOICERELAY_METRICS", "VOICERELAY_CLUSTER_ROUTES"},
    "transceiver": {"VOICERELAY_DRAIN_GRACE", "VOICERELAY_INGRESS"},
}
HELPERS = {"POD_IP"}  # set from the downward API, only used inside $(...) references


def kustomize(variant: str) -> list[dict[str, Any]]:
    """The variant as `kubectl kustomize` renders it, or deploy/render.py without kubectl."""
    directory = DEPLOY / variant
    if shutil.which("kubectl") is None:
        return render.render(directory)
    out = subprocess.run(
        ["kubectl", "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


@pytest.fixture(scope="module", params=VARIANTS)
def objects(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return kustomize(request.param)


def one(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def pod_spec(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return one(objects, kind, name)["spec"]["template"]["spec"]


def container_env(objects: list[dict[str, Any]], container: dict[str, Any]) -> dict[str, str]:
    """Every variable the container gets: its ConfigMaps' data, then its own env values."""
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        env.update(one(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {}))
    for item in container.get("env", []):
        source = "value" if "value" in item else next(iter(item["valueFrom"]))
        env[item["name"]] = item["value"] if source == "value" else f"<from {source}>"
    return env


def cli_env(command: str) -> dict[str, str]:
    """Environment variable -> option of a relayctl command, each option in its --help."""
    cmd = cli.commands[command]
    help_text = CliRunner().invoke(cli, [command, "--help"], terminal_width=200).output
    documented = set(re.findall(r"^\s+(--[a-z][a-z0-9-]*)", help_text, re.MULTILINE))
    return {
        param.envvar: param.opts[0]
        for param in cmd.params
        if isinstance(param, click.Option)
        and isinstance(param.envvar, str)
        and param.opts[0] in documented
    }


# --- rendering and schemas -------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_offline_renderer_matches_kubectl(variant: str) -> None:
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl not installed: deploy/render.py is the only renderer here")
    key = lambda o: (o["kind"], o["metadata"]["name"])  # noqa: E731
    assert sorted(render.render(DEPLOY / variant), key=key) == sorted(kustomize(variant), key=key)


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "kustomization.yaml").write_text("resources: []\npatches: []\n")
    with pytest.raises(render.RenderError, match="patches"):
        render.render(tmp_path)


@pytest.mark.parametrize(
    ("reference", "expected"),
    [
        ("voicerelay:0.1.0", "registry.example.com/voicerelay:0.1.0"),
        ("voicerelay", "registry.example.com/voicerelay:0.1.0"),
        ("localhost:5000/voicerelay:1", "localhost:5000/voicerelay:1"),
        ("voicerelay-agent:2", "voicerelay-agent:2"),
    ],
)
def test_renderer_image_rewrite(tmp_path: Path, reference: str, expected: str) -> None:
    pod = {"containers": [{"name": "c", "image": reference}]}
    (tmp_path / "pod.yaml").write_text(
        yaml.safe_dump({"kind": "Deployment", "spec": {"template": {"spec": pod}}})
    )
    (tmp_path / "kustomization.yaml").write_text(
        "resources: [pod.yaml]\nimages:\n"
        "  - {name: voicerelay, newName: registry.example.com/voicerelay, newTag: 0.1.0}\n"
    )
    (obj,) = render.render(tmp_path)
    assert obj["spec"]["template"]["spec"]["containers"][0]["image"] == expected


def test_renderer_cli_reports_errors_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert render.main([str(tmp_path)]) == 1
    assert capsys.readouterr().err == f"render: {tmp_path}: no kustomization.yaml\n"
    assert render.main([str(DEPLOY / "overlays" / "eu-west")]) == 0
    assert "VOICERELAY_CLUSTER_ID: '1'" in capsys.readouterr().out


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_object_validates_against_the_kubernetes_schemas(
    objects: list[dict[str, Any]], version: str
) -> None:
    assert objects
    for obj in objects:
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} @ {version}: {path}: {exc}")


def test_schema_validation_catches_a_broken_object(objects: list[dict[str, Any]]) -> None:
    broken = json.loads(json.dumps(one(objects, "DaemonSet", "voicerelay-relay")))
    broken["spec"]["template"]["spec"]["hostNetwork"] = "yes"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSIONS[-1], strict=True)


def test_everything_is_namespaced(objects: list[dict[str, Any]]) -> None:
    assert {o["metadata"].get("namespace") for o in objects} == {"voicerelay"}


# --- relay -----------------------------------------------------------------------------------


def test_relay_is_a_host_network_daemonset_pinned_one_worker_per_core(
    objects: list[dict[str, Any]],
) -> None:
    spec = pod_spec(objects, "DaemonSet", "voicerelay-relay")
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    (relay,) = spec["containers"]
    resources = relay["resources"]
    assert resources["requests"] == resources["limits"], "Guaranteed QoS for exclusive cores"
    cpus = resources["limits"]["cpu"]
    assert cpus.isdigit(), "whole CPUs, so the static CPU manager pins them"
    env = container_env(objects, relay)
    assert env["VOICERELAY_WORKERS"] == cpus
    assert "VOICERELAY_NO_PIN" not in env
    udp = [p for p in relay["ports"] if p["protocol"] == "UDP"]
    listen_port = int(env["VOICERELAY_LISTEN"].rsplit(":", 1)[1])
    assert [(p["containerPort"], p["hostPort"]) for p in udp] == [(listen_port, listen_port)]


def test_relay_probes_and_scrape_point_at_its_metrics_port(objects: list[dict[str, Any]]) -> None:
    ds = one(objects, "DaemonSet", "voicerelay-relay")
    (relay,) = ds["spec"]["template"]["spec"]["containers"]
    env = container_env(objects, relay)
    metrics_port = int(env["VOICERELAY_METRICS"].rsplit(":", 1)[1])
    assert env["VOICERELAY_METRICS"] == f"$(POD_IP):{metrics_port}"
    ports = {p["name"]: p["containerPort"] for p in relay["ports"]}
    assert relay["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert relay["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert ports[relay[probe]["httpGet"]["port"]] == metrics_port
    annotations = ds["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_port)
    assert annotations["prometheus.io/path"] == "/metrics"


def test_relay_internal_address_is_the_node_address(objects: list[dict[str, Any]]) -> None:
    (relay,) = pod_spec(objects, "DaemonSet", "voicerelay-relay")["containers"]
    assert pod_ip_field(relay) == "status.podIP"
    assert container_env(objects, relay)["VOICERELAY_INTERNAL"].startswith("$(POD_IP):")


# --- transceivers ----------------------------------------------------------------------------


def pod_ip_field(container: dict[str, Any]) -> str:
    (item,) = [e for e in container["env"] if e["name"] == "POD_IP"]
    return item["valueFrom"]["fieldRef"]["fieldPath"]


def test_transceiver_seals_its_pod_ip_and_listens_there(objects: list[dict[str, Any]]) -> None:
    (transceiver,) = pod_spec(objects, "Deployment", "voicerelay-transceiver")["containers"]
    assert pod_ip_field(transceiver) == "status.podIP"
    env = container_env(objects, transceiver)
    internal = env["VOICERELAY_TRANSCEIVER_INTERNAL"]
    assert internal.startswith("$(POD_IP):")
    names = [e["name"] for e in transceiver["env"]]
    assert names.index("POD_IP") < names.index("VOICERELAY_TRANSCEIVER_INTERNAL")
    udp = {p["containerPort"] for p in transceiver["ports"] if p["protocol"] == "UDP"}
    assert udp == {int(internal.rsplit(":", 1)[1])}


def test_transceiver_probes_use_its_signaling_port(objects: list[dict[str, Any]]) -> None:
    deployment = one(objects, "Deployment", "voicerelay-transceiver")
    (transceiver,) = deployment["spec"]["template"]["spec"]["containers"]
    signaling = int(container_env(objects, transceiver)["VOICERELAY_HTTP"].rsplit(":", 1)[1])
    ports = {p["name"]: p["containerPort"] for p in transceiver["ports"]}
    assert transceiver["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert transceiver["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for probe in ("livenessProbe", "readinessProbe"):
        assert ports[transceiver[probe]["httpGet"]["port"]] == signaling
    annotations = deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(signaling)
    service = one(objects, "Service", "voicerelay-transceiver")
    assert service["spec"]["selector"] == deployment["spec"]["selector"]["matchLabels"]


def test_termination_grace_outlasts_the_drain(objects: list[dict[str, Any]]) -> None:
    spec = pod_spec(objects, "Deployment", "voicerelay-transceiver")
    grace = float(container_env(objects, spec["containers"][0])["VOICERELAY_DRAIN_GRACE"])
    assert spec["terminationGracePeriodSeconds"] >= grace + 10


def test_pdb_selects_exactly_the_transceivers(objects: list[dict[str, Any]]) -> None:
    pdb = one(objects, "PodDisruptionBudget", "voicerelay-transceiver")
    selector = pdb["spec"]["selector"]["matchLabels"]
    selected = [
        o
        for o in objects
        if "template" in o.get("spec", {})
        and selector.items() <= o["spec"]["template"]["metadata"]["labels"].items()
    ]
    assert [(o["kind"], o["metadata"]["name"]) for o in selected] == [
        ("Deployment", "voicerelay-transceiver")
    ]


# --- shared settings -------------------------------------------------------------------------


def workloads(objects: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    """(relayctl command, container) of every voicerelay container."""
    for kind, name in (("DaemonSet", "voicerelay-relay"), ("Deployment", "voicerelay-transceiver")):
        for container in pod_spec(objects, kind, name)["containers"]:
            yield container["args"][0], container


def test_every_variable_set_is_one_relayctl_documents(objects: list[dict[str, Any]]) -> None:
    for command, container in workloads(objects):
        documented = cli_env(command)
        pending = CONTRACT_ENV[command] - documented.keys()
        for name in container_env(objects, container):
            assert name in HELPERS or name in documented or name in pending, (
                f"relayctl {command} reads no {name}"
            )


def test_references_name_variables_defined_before_them(objects: list[dict[str, Any]]) -> None:
    """Kubernetes expands $(NAME) only for variables defined earlier; else it stays literal."""
    for _command, container in workloads(objects):
        defined = {
            key
            for source in container.get("envFrom", [])
            for key in one(objects, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        }
        for item in container["env"]:
            for name in re.findall(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", item.get("value", "")):
                assert name in defined, f"{item['name']} uses $({name}) before it is set"
            defined.add(item["name"])


def test_the_pending_contract_variables_are_not_misnamed() -> None:
    """A contract option that already exists must be read from the variable we set."""
    expected = {
        "start": {
            "--metrics": "VOICERELAY_METRICS",
            "--cluster-routes": "VOICERELAY_CLUSTER_ROUTES",
        },
        "transceiver": {
            "--drain-grace": "VOICERELAY_DRAIN_GRACE",
            "--ingress": "VOICERELAY_INGRESS",
        },
    }
    for command, options in expected.items():
        by_option = {opt: env for env, opt in cli_env(command).items()}
        for option, env in options.items():
            if option in by_option:
                assert by_option[option] == env


def test_both_ends_share_secret_cluster_id_and_redis(objects: list[dict[str, Any]]) -> None:
    envs = {command: container_env(objects, c) for command, c in workloads(objects)}
    assert envs["start"]["VOICERELAY_CLUSTER_ID"] == envs["transceiver"]["VOICERELAY_CLUSTER_ID"]
    secret_files = {env["VOICERELAY_SECRET_FILE"] for env in envs.values()}
    assert len(secret_files) == 1
    for _command, container in workloads(objects):
        mounts = [m for m in container["volumeMounts"] if m["name"] == "secret"]
        assert [m["mountPath"] for m in mounts] == [str(Path(*secret_files).parent)]
    redis = one(objects, "Service", "voicerelay-redis")["spec"]["ports"][0]["port"]
    assert envs["start"]["VOICERELAY_REDIS"] == f"redis://voicerelay-redis:{redis}/0"


def test_overlays_set_their_own_cluster_and_route_to_each_other() -> None:
    clusters = {}
    for variant in VARIANTS[1:]:
        data = {
            o["metadata"]["name"]: o["data"] for o in kustomize(variant) if o["kind"] == "ConfigMap"
        }
        clusters[data["voicerelay-cluster"]["VOICERELAY_CLUSTER_ID"]] = data
    assert "0" not in clusters and len(clusters) == len(VARIANTS) - 1
    for cluster_id, data in clusters.items():
        routes = dict(
            r.split("=", 1)
            for r in data["voicerelay-relay"]["VOICERELAY_CLUSTER_ROUTES"].split(",")
        )
        assert set(routes) == set(clusters) - {cluster_id}
        for other, address in routes.items():
            assert clusters[other]["voicerelay-transceiver"]["VOICERELAY_RELAY_PUBLIC"] == address
        ingresses = dict(
            i.split("=", 1) for i in data["voicerelay-transceiver"]["VOICERELAY_INGRESS"].split()
        )
        assert sorted(ingresses.values()) == sorted(routes.values())


# --- dashboard -------------------------------------------------------------------------------


def dashboard_metrics() -> set[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert exprs
    return {name for expr in exprs for name in re.findall(r"\bvoicerelay_[a-z0-9_]+", expr)}


def histogram_of(series: str) -> str:
    """The histogram a _bucket/_sum/_count series belongs to, else the name itself."""
    for histogram in HISTOGRAMS:
        if series.startswith(histogram + "_"):
            return histogram
    return series


def test_dashboard_queries_only_contract_metrics_and_all_of_them() -> None:
    series = COUNTERS_AND_GAUGES | {
        h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")
    }
    used = dashboard_metrics()
    assert used <= series, f"not in the contract: {sorted(used - series)}"
    assert {histogram_of(m) for m in used} == COUNTERS_AND_GAUGES | HISTOGRAMS
