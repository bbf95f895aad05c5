"""The Kubernetes manifests: overlays render and pass the offline validation, the generated
Serve configs match the catalog, and known-bad manifests are rejected for the right reason."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from typer.testing import CliRunner

from cluster.config.catalog import load_catalog
from cluster.config.settings import Profile
from cluster.tools.checkout import REPO_ROOT
from cluster.tools.k8s.cli import k8s_app
from cluster.tools.k8s.generate import GENERATED_FILE, OVERLAYS, drift, serve_config_patch
from cluster.tools.k8s.problems import K8sError
from cluster.tools.k8s.render import K8S_DIR, render
from cluster.tools.k8s.resources import actor_needs, group_resources, quantity
from cluster.tools.k8s.schema import DEFAULT_CRDS, drop_nulls, openapi_to_jsonschema
from cluster.tools.k8s.secret_files import secret_sources
from cluster.tools.k8s.validate import validate_docs, validate_target

BAD = Path(__file__).parent / "fixtures" / "k8s_bad"
CRDS = (Path(os.environ.get("CLUSTER_K8S_CRDS", DEFAULT_CRDS)),)
runner = CliRunner()


def _need(ok: bool, what: str) -> None:
    """CI must run these checks: a missing tool fails there and only skips on a dev box."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(f"{what} is required in CI")
        pytest.skip(f"{what} is not available")


@pytest.fixture(scope="module")
def tools() -> None:
    _need(shutil.which("kubectl") is not None, "kubectl (for `kubectl kustomize`)")
    _need(CRDS[0].exists(), f"the CRDs at {CRDS[0]} (set CLUSTER_K8S_CRDS)")


@pytest.fixture(scope="module")
def rendered(tools: None) -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S_DIR / "overlays" / name) for name in OVERLAYS}


def _one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    [doc] = [d for d in docs if d["kind"] == kind]
    return doc


def _serve_config(docs: list[dict[str, Any]]) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(_one(docs, "RayService")["spec"]["serveConfigV2"])
    return config


# --- the committed overlays ----------------------------------------------------------------


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_passes_full_validation(overlay: str, rendered: dict[str, list[dict[str, Any]]]
                                        ) -> None:
    docs = rendered[overlay]
    assert {d["kind"] for d in docs} >= {"Namespace", "ConfigMap", "Secret", "RayService",
                                        "PodMonitor", "StatefulSet", "Service", "NetworkPolicy"}
    assert validate_docs(docs, overlay, CRDS) == []


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlay_serves_its_profile_from_the_catalog(
        overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    profile = OVERLAYS[overlay].profile
    config = _serve_config(rendered[overlay])
    [app] = config["applications"]
    assert app["import_path"] == "cluster.app:build_app"
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    specs = load_catalog(REPO_ROOT / "deployments", profile)
    assert [m["id"] for m in app["args"]["models"]] == [s.id for s in specs]
    assert [d["name"] for d in app["deployments"]] == ["Ingress",
                                                       *(s.deployment_name for s in specs)]
    assert _one(rendered[overlay], "ConfigMap")["data"]["CLUSTER_PROFILE"] == profile.value


def test_gpu_overlay_shape(rendered: dict[str, list[dict[str, Any]]]) -> None:
    rs = _one(rendered["gpu"], "RayService")
    spec = rs["spec"]
    assert spec["upgradeStrategy"] == {"type": "None"}
    assert spec["serveService"]["metadata"]["name"] == "llm-api"
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]} >= {
        6379, 8265, 8000, 8080}
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert sorted(groups) == ["a100x4", "cpu", "h100x2", "h100x8"]
    for name, gpus in (("h100x2", "2"), ("a100x4", "4"), ("h100x8", "8")):
        pod = groups[name]["template"]["spec"]
        res = pod["containers"][0]["resources"]
        assert res["requests"]["nvidia.com/gpu"] == res["limits"]["nvidia.com/gpu"] == gpus
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in \
            pod["tolerations"]
        assert "nvidia.com/gpu.product" in pod["nodeSelector"]
        assert {"medium": "Memory", "sizeLimit": pod["volumes"][0]["emptyDir"]["sizeLimit"]} \
            == pod["volumes"][0]["emptyDir"]
    # Every model's accelerator is declared as a Ray resource, so the autoscaler can add pods.
    assert groups["a100x4"]["resources"] == {"accelerator_type:A100-80G": "1"}
    env = {e["name"]: e["valueFrom"]["secretKeyRef"]
           for e in groups["h100x2"]["template"]["spec"]["containers"][0]["env"]}
    assert env["CLUSTER_ADMIN_KEY"] == {"name": "llm-app", "key": "CLUSTER_ADMIN_KEY"}
    assert env["CLUSTER_REDIS_URL"] == {"name": "llm-redis", "key": "CLUSTER_REDIS_URL"}


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_every_ray_process_gets_the_serve_settings(overlay: str,
                                                   rendered: dict[str, list[dict[str, Any]]]
                                                   ) -> None:
    """The settings LocalStack sets before ray.init reach every Ray pod through the ConfigMap
    that each container of the RayService reads."""
    from cluster.config.serve_options import RAY_SERVE_ENV

    [config] = [d for d in rendered[overlay] if d["kind"] == "ConfigMap"
                and d["metadata"]["name"].startswith("llm-config")]
    assert RAY_SERVE_ENV.items() <= config["data"].items()
    rs = _one(rendered[overlay], "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            refs = [e["configMapRef"]["name"] for e in container.get("envFrom", [])]
            assert config["metadata"]["name"] in refs


def test_cpu_demo_has_no_gpu(rendered: dict[str, list[dict[str, Any]]]) -> None:
    text = yaml.safe_dump_all(rendered["cpu-demo"])
    assert "nvidia.com/gpu" not in text
    rs = _one(rendered["cpu-demo"], "RayService")
    assert rs["metadata"]["namespace"] == "llm-demo"
    assert rs["spec"]["upgradeStrategy"] == {"type": "NewCluster"}


def test_placeholder_secrets_never_land_in_the_repo(tools: None) -> None:
    overlay = K8S_DIR / "overlays" / "cpu-demo"
    before = sorted(p.name for p in (overlay / "secrets").iterdir())
    docs = render(overlay)
    assert sorted(p.name for p in (overlay / "secrets").iterdir()) == before
    secret = next(d for d in docs if d["kind"] == "Secret" and d["metadata"]["name"] == "llm-app")
    assert set(secret["data"]) == {"CLUSTER_ADMIN_KEY", "HF_TOKEN"}
    missing = [p for p in secret_sources(overlay) if not p.exists()]
    if missing:  # no real secret files here: refusing placeholders must fail, not render
        with pytest.raises(K8sError, match="missing secret files"):
            render(overlay, placeholder_secrets=False)


# --- generation and drift -----------------------------------------------------------------


def test_generated_files_match_the_catalog() -> None:
    result = runner.invoke(k8s_app, ["generate", "--check"])
    assert result.exit_code == 0, result.output
    assert drift(REPO_ROOT / "deployments", K8S_DIR) == []


def test_generate_check_fails_with_a_diff_on_catalog_change(tmp_path: Path) -> None:
    deployments = tmp_path / "deployments"
    shutil.copytree(REPO_ROOT / "deployments", deployments)
    path = deployments / "wizardlm-2-8x22b.yaml"
    path.write_text(path.read_text().replace("max_replicas: 2", "max_replicas: 3"))
    result = runner.invoke(k8s_app, ["generate", "--check",
                                     "--deployments-dir", str(deployments)])
    assert result.exit_code == 1
    assert "overlays/gpu/serve-config.yaml" in result.output
    added = [line for line in result.output.splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    # The model in args.models and its Serve deployment's autoscaling_config, nothing else.
    assert len(added) == 2 and all(line.endswith("max_replicas: 3") for line in added)
    assert "cpu-demo" not in result.output  # the local profile did not change


def test_generate_writes_only_changed_files(tmp_path: Path) -> None:
    k8s_dir = tmp_path / "k8s"
    for overlay in OVERLAYS:
        (k8s_dir / "overlays" / overlay).mkdir(parents=True)
    args = ["generate", "--k8s-dir", str(k8s_dir)]
    first = runner.invoke(k8s_app, args)
    assert first.exit_code == 0 and first.output.count("wrote ") == 2
    committed = K8S_DIR / "overlays" / "gpu" / GENERATED_FILE
    assert (k8s_dir / "overlays" / "gpu" / GENERATED_FILE).read_text() == \
        committed.read_text()
    assert "already match" in runner.invoke(k8s_app, args).output


def test_generated_config_ignores_the_callers_environment(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    monkeypatch.setenv("CLUSTER_INGRESS_MAX_REPLICAS", "99")
    assert drift(REPO_ROOT / "deployments", K8S_DIR) == []


def test_generated_models_round_trip_to_the_catalog() -> None:
    from cluster.config.catalog import ModelSpec

    text = serve_config_patch(OVERLAYS["gpu"], REPO_ROOT / "deployments")
    config = yaml.safe_load(yaml.safe_load(text)["spec"]["serveConfigV2"])
    specs = [ModelSpec.model_validate(m) for m in config["applications"][0]["args"]["models"]]
    assert specs == load_catalog(REPO_ROOT / "deployments", Profile.gpu)
    ingress = config["applications"][0]["deployments"][0]
    assert ingress["autoscaling_config"]["min_replicas"] == 2  # the gpu overlay's override


def test_surge_and_queue_bounds_reach_serve_and_pass_its_schema(tmp_path: Path) -> None:
    from cluster.config.catalog import CatalogError
    from cluster.tools.k8s.checks_ray import parse_serve_config

    deployments = tmp_path / "deployments"
    shutil.copytree(REPO_ROOT / "deployments", deployments)
    path = deployments / "wizardlm-2-8x22b.yaml"
    path.write_text(path.read_text() + "max_surge_percent: 25\nmax_queued_requests: 64\n")
    patch = yaml.safe_load(serve_config_patch(OVERLAYS["gpu"], deployments))
    config, problems = parse_serve_config(patch, "patch")
    assert problems == [] and config is not None
    surge = {d["name"]: d.get("max_surge_percent")
             for d in config["applications"][0]["deployments"]}
    assert surge["model-microsoft-wizardlm-2-8x22b"] == 25
    assert list(surge.values()).count(None) == len(surge) - 1  # 0 is Serve's default: unsaid
    queues = [d.get("max_queued_requests") for d in config["applications"][0]["deployments"]]
    assert sorted(queues, key=str) == [64] + [None] * (len(queues) - 1)
    path.write_text(path.read_text().replace("max_surge_percent: 25", "max_surge_percent: 150"))
    with pytest.raises(CatalogError, match=r"wizardlm-2-8x22b\.yaml.*max_surge_percent"):
        load_catalog(deployments, Profile.gpu)


# --- known-bad manifests ------------------------------------------------------------------


@pytest.mark.parametrize(("fixture", "check", "says"), [
    ("gpu-request-not-limit.yaml", "gpu-request-limit", "request 1 != limit 2"),
    ("bad-import-path.yaml", "import-path", "has no attribute 'build_ap'"),
    ("name-too-long.yaml", "name-length", "48 characters; KubeRay allows at most 47"),
    ("crd-unknown-field.yaml", "crd-schema", "'upgradeStratgy' was unexpected"),
    ("crd-wrong-type.yaml", "crd-schema", "enableInTreeAutoscaling: 'yes' is not of type"),
    ("missing-worker-group.yaml", "worker-group", "accelerator_type:A100-80G"),
    ("head-schedules-replicas.yaml", "head-group", "num-cpus is '1'"),
    ("no-ray-auth.yaml", "ray-auth", "authOptions.mode is not 'token'"),
])
def test_bad_manifest_is_rejected_for_the_right_reason(tools: None, fixture: str, check: str,
                                                       says: str) -> None:
    count, problems = validate_target(BAD / fixture, CRDS)
    assert count == 1
    assert [p.check for p in problems] == [check], [str(p) for p in problems]
    assert says in problems[0].message


def test_validate_cli_exit_codes(tools: None) -> None:
    crds = ["--crds", str(CRDS[0])]
    bad = runner.invoke(k8s_app, ["validate", str(BAD / "bad-import-path.yaml"), *crds])
    assert bad.exit_code == 1
    assert "[import-path]" in bad.output
    missing = runner.invoke(k8s_app, ["validate", "no-such-overlay", *crds])
    assert missing.exit_code == 2


# --- pieces -------------------------------------------------------------------------------


def test_crd_schema_conversion_follows_the_api_server() -> None:
    schema = openapi_to_jsonschema({
        "type": "object",
        "required": ["name", "replicas"],
        "properties": {
            "name": {"type": "string"},
            "replicas": {"type": "integer", "default": 1},  # defaulted: not required
            "port": {"x-kubernetes-int-or-string": True,
                     "anyOf": [{"type": "integer"}, {"type": "string"}]},
            "cpu": {"x-kubernetes-int-or-string": True},
            "note": {"type": "string", "nullable": True},
            "free": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                     "properties": {"a": {"type": "string"}}},
        },
    })
    check = jsonschema.Draft7Validator(schema)
    assert check.is_valid({"name": "x", "port": "http", "cpu": 2, "note": None,
                           "free": {"a": "b", "anything": 1}})
    assert not check.is_valid({"replicas": 2})  # name is required
    assert not check.is_valid({"name": "x", "unknown": 1})
    assert not check.is_valid({"name": "x", "cpu": 0.5})
    assert drop_nulls({"a": None, "b": [{"c": None, "d": 1}]}) == {"b": [{"d": 1}]}


def test_quantities_and_group_resources() -> None:
    assert quantity("500m") == 0.5
    assert quantity("200Gi") == 200 * 2**30
    assert quantity(4) == 4
    group = {"rayStartParams": {"num-cpus": "6", "resources": '"{\\"disk\\": 2}"'},
             "template": {"spec": {"containers": [{"resources": {
                 "limits": {"cpu": "8", "memory": "16Gi", "nvidia.com/gpu": "1"}}}]}}}
    assert group_resources(group) == {"CPU": 6, "GPU": 1, "memory": 16 * 2**30, "disk": 2}
    needs = actor_needs({"num_cpus": 2, "num_gpus": 1, "accelerator_type": "L4"})
    assert needs == {"CPU": 2, "GPU": 1, "accelerator_type:L4": 0.001}


def test_secrets_command_creates_missing_files_only(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    k8s_dir = tmp_path / "k8s"
    shutil.copytree(K8S_DIR / "overlays" / "gpu", k8s_dir / "overlays" / "gpu",
                    ignore=shutil.ignore_patterns("*.env"))
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    args = ["secrets", "gpu", "--k8s-dir", str(k8s_dir)]
    assert runner.invoke(k8s_app, args).exit_code == 0
    secrets_dir = k8s_dir / "overlays" / "gpu" / "secrets"
    app = dict(line.split("=", 1) for line in (secrets_dir / "app.env").read_text().split())
    redis = dict(line.split("=", 1) for line in (secrets_dir / "redis.env").read_text().split())
    assert app["HF_TOKEN"] == "hf_test" and len(app["CLUSTER_ADMIN_KEY"]) >= 32
    assert redis["CLUSTER_REDIS_URL"] == f"redis://:{redis['REDIS_PASSWORD']}@llm-redis:6379/0"
    assert stat.S_IMODE((secrets_dir / "app.env").stat().st_mode) == 0o600
    before = (secrets_dir / "app.env").read_text()
    again = runner.invoke(k8s_app, args)
    assert "kept" in again.output and (secrets_dir / "app.env").read_text() == before


# --- who may reach the Ray pods -------------------------------------------------------------


def _without(docs: list[dict[str, Any]], kind: str, *names: str) -> list[dict[str, Any]]:
    return [d for d in docs if not (d["kind"] == kind and (not names or
                                                           d["metadata"]["name"] in names))]


def _policy(name: str, rule: dict[str, Any], namespace: str = "llm") -> dict[str, Any]:
    return {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "llm"}},
                     "policyTypes": ["Ingress"], "ingress": [rule]}}


def _checks(problems: list[Any]) -> list[str]:
    return [f"{p.check}: {p.message}" for p in problems]


@pytest.mark.parametrize("overlay", sorted(OVERLAYS))
def test_overlays_close_rays_ports_and_turn_its_auth_on(
        overlay: str, rendered: dict[str, list[dict[str, Any]]]) -> None:
    from cluster.tools.k8s.checks_security import policy_problems

    docs = rendered[overlay]
    assert policy_problems(docs, overlay) == []
    auth = _one(docs, "RayService")["spec"]["rayClusterConfig"]["authOptions"]
    assert auth == {"mode": "token", "secretName": "llm-ray-token"}
    [secret] = [d for d in docs if d["kind"] == "Secret" and
                d["metadata"]["name"] == "llm-ray-token"]
    assert set(secret["data"]) == {"auth_token"}


def test_an_overlay_without_the_policies_is_refused(
        rendered: dict[str, list[dict[str, Any]]]) -> None:
    from cluster.tools.k8s.checks_security import policy_problems

    docs = rendered["gpu"]
    none = _checks(policy_problems(_without(docs, "NetworkPolicy"), "gpu"))
    groups = {"headGroupSpec", "workerGroupSpecs[cpu]", "workerGroupSpecs[h100x2]"}
    assert all(any(g in c and "no Ingress NetworkPolicy" in c for c in none) for g in groups)
    alone = _checks(policy_problems(_without(docs, "NetworkPolicy", "llm-ray-internal"), "gpu"))
    assert alone and all("no policy lets the other Ray pods in" in c for c in alone)
    no_token = _checks(policy_problems(_without(docs, "Secret", "llm-ray-token"), "gpu"))
    assert no_token == ["ray-auth: authOptions.secretName 'llm-ray-token' is not a Secret of "
                        "this overlay with the key 'auth_token'"]


@pytest.mark.parametrize(("rule", "says"), [
    ({}, "lets any peer in"),  # no `from`: everyone
    ({"from": [{"namespaceSelector": {}}]}, "lets any peer in"),  # every namespace
    ({"from": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}, "lets any peer in"),
    ({"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}]}, "opens every port"),
    ({"from": [{"namespaceSelector": {"matchLabels": {"team": "a"}}}],
      "ports": [{"port": 6379}]}, "opens 6379"),  # the GCS
    ({"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "llm-cluster"}}}]},
     "opens every port"),  # selects Redis too, so not only Ray's own pods
])
def test_a_policy_opening_rays_own_ports_is_refused(
        rendered: dict[str, list[dict[str, Any]]], rule: dict[str, Any], says: str) -> None:
    from cluster.tools.k8s.checks_security import policy_problems

    docs = [*rendered["gpu"], _policy("too-open", rule)]
    found = policy_problems(docs, "gpu")
    assert [(p.resource, p.check) for p in found] == [("NetworkPolicy/too-open",
                                                       "network-policy")]
    assert says in found[0].message


def test_validate_refuses_an_overlay_whose_base_lost_its_policies(tools: None,
                                                                   tmp_path: Path) -> None:
    from cluster.tools.k8s.manifests import pod_templates
    from cluster.tools.k8s.secret_files import new_secret_values, write_secret_files

    k8s = tmp_path / "k8s"
    shutil.copytree(K8S_DIR, k8s, ignore=shutil.ignore_patterns("*.env"))
    base = k8s / "base" / "kustomization.yaml"
    base.write_text(base.read_text().replace("  - networkpolicies.yaml\n", ""))
    overlay = k8s / "overlays" / "gpu"
    write_secret_files(overlay / "secrets", [p.name for p in secret_sources(overlay)],
                       new_secret_values(None, placeholder=True))
    _, problems = validate_target(overlay, CRDS)
    assert {p.check for p in problems} == {"network-policy"}
    groups = len(list(pod_templates(_one(render(overlay), "RayService"))))
    assert len(problems) == groups == 5  # the head, the CPU workers, 3 GPU groups
