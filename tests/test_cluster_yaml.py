"""cluster.yaml against what docs/cluster.md grants and names, read statically (no AWS):
the workers launch under the IAM policy the docs tell users to paste, and every section the
yaml or the README points to exists. The rules are a function (``violations``) so that a
mutated config or page shows each rule can fail."""

import copy
import fnmatch
import json
import os
import re
import subprocess
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.aws.config import DEFAULT_RAY_IAM_ROLE

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "cluster.md"
SSM = "resolve:ssm:"
SECTION_REF = re.compile(r'docs/cluster\.md, "([^"]+)"')
ANCHOR_REF = re.compile(r"docs/cluster\.md#([\w-]+)")


def docs_policy(docs: str) -> tuple[str, dict]:
    """(role, policy document) of the docs' `aws iam put-role-policy` block: the JSON of its
    heredoc and the role it is put on."""
    found = re.search(r"<<'EOF'\n(?P<json>.*?)\nEOF\n(?P<rest>.*?)```", docs, re.S)
    assert found, "docs/cluster.md has no `cat > ... <<'EOF'` policy block"
    role = re.search(r"put-role-policy --role-name (\S+)", found["rest"])
    assert role, "the policy block puts the policy on no --role-name"
    return role.group(1), json.loads(found["json"])


def allowed(policy: dict, action: str, resource: str) -> bool:
    """Whether an Allow statement of ``policy`` grants ``action`` on ``resource``."""
    for st in policy.get("Statement", []):
        actions = st.get("Action", [])
        resources = st.get("Resource", [])
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        if st.get("Effect") == "Allow" and action in actions and any(
                fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


def passable_roles(policy: dict) -> set[str]:
    """Role names the policy lets its role pass (iam:PassRole resources)."""
    out = set()
    for st in policy.get("Statement", []):
        if st.get("Effect") == "Allow" and "iam:PassRole" in str(st.get("Action")):
            resources = st.get("Resource", [])
            for arn in [resources] if isinstance(resources, str) else resources:
                out.add(arn.rsplit("role/", 1)[-1])
    return out


def launching_role(config: dict) -> str:
    """The role the head's autoscaler launches workers with: the head's own instance
    profile when cluster.yaml names one, else Ray's default role."""
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    profile = head.get("IamInstanceProfile") or {}
    return profile.get("Name") or profile.get("Arn", "").rsplit("/", 1)[-1] or \
        DEFAULT_RAY_IAM_ROLE


def github_anchor(heading: str) -> str:
    """GitHub's id for a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def violations(config: dict, yaml_text: str, docs: str, readme: str) -> list[str]:
    """Every way cluster.yaml (parsed and as text) and the README disagree with the docs."""
    out = []
    role, policy = docs_policy(docs)
    launcher = launching_role(config)
    region = config["provider"]["region"]
    for name, spec in config["available_node_types"].items():
        if name == config["head_node_type"]:
            continue  # launched by `ray up` with the user's own credentials
        node = spec["node_config"]
        image = str(node.get("ImageId", ""))
        if image.startswith(SSM):
            arn = f"arn:aws:ssm:{region}::parameter{image[len(SSM):]}"
            if role != launcher:
                out.append(f"{name}: its ImageId is resolved by role {launcher}, but the docs "
                           f"grant ssm:GetParameters to {role}")
            elif not allowed(policy, "ssm:GetParameters", arn):
                out.append(f"{name}: ssm:GetParameters on {arn} is not granted by the docs' "
                           "policy")
        profile = (node.get("IamInstanceProfile") or {}).get("Name")
        if profile and (profile not in passable_roles(policy) or role != launcher):
            out.append(f"{name}: instance profile {profile} is not a role the docs give "
                       f"{launcher} iam:PassRole for ({sorted(passable_roles(policy))})")
    headings = {line.lstrip("#").strip() for line in docs.splitlines()
                if line.startswith("#")}
    for title in SECTION_REF.findall(yaml_text) + SECTION_REF.findall(readme):
        if title not in headings:
            out.append(f'no section "{title}" in docs/cluster.md')
    anchors = {github_anchor(h) for h in headings}
    for anchor in ANCHOR_REF.findall(readme):
        if anchor not in anchors:
            out.append(f"no section with anchor #{anchor} in docs/cluster.md")
    return out


@pytest.fixture(scope="module")
def texts() -> dict:
    return {"yaml_text": (ROOT / "cluster.yaml").read_text(), "docs": DOCS.read_text(),
            "readme": (ROOT / "README.md").read_text()}


def test_the_documented_cluster_follows_the_rules(texts):
    config = yaml.safe_load(texts["yaml_text"])
    assert violations(config, **texts) == []
    # the rules had something to check: an SSM image on the workers, sections named
    assert any(str(t["node_config"]["ImageId"]).startswith(SSM)
               for t in config["available_node_types"].values())
    assert len(SECTION_REF.findall(texts["yaml_text"])) >= 5


def _drop_ssm_statement(docs: str) -> str:
    role, policy = docs_policy(docs)
    old = json.dumps(policy, indent=2)
    policy["Statement"] = [s for s in policy["Statement"] if s["Action"] != "ssm:GetParameters"]
    body = re.search(r"<<'EOF'\n(.*?)\nEOF", docs, re.S).group(1)
    assert json.loads(body) == json.loads(old)
    return docs.replace(body, json.dumps(policy, indent=2))


def _worker(config: dict) -> dict:
    return config["available_node_types"]["ray.worker.gpu"]["node_config"]


MUTATIONS = {
    "policy without ssm:GetParameters": (
        lambda c, t: t.update(docs=_drop_ssm_statement(t["docs"])), "is not granted"),
    "worker image from another SSM parameter": (
        lambda c, t: _worker(c).update(ImageId=SSM + "/aws/service/other/ami-id"),
        "is not granted"),
    "worker profile the head may not pass": (
        lambda c, t: _worker(c).update(IamInstanceProfile={"Name": "other-role"}),
        "iam:PassRole"),
    "head launching with its own profile": (
        lambda c, t: c["available_node_types"]["ray.head.cpu"]["node_config"].update(
            IamInstanceProfile={"Name": "my-head-role"}), "resolved by role my-head-role"),
    "yaml naming a missing section": (
        lambda c, t: t.update(yaml_text=t["yaml_text"] + '\n# docs/cluster.md, "Nowhere"\n'),
        'no section "Nowhere"'),
    "README linking a missing anchor": (
        lambda c, t: t.update(readme=t["readme"] + "\n[x](docs/cluster.md#nowhere)\n"),
        "anchor #nowhere"),
    "docs renaming a section the yaml names": (
        lambda c, t: t.update(docs=t["docs"].replace("## The GPU worker\n", "## Workers\n")),
        'no section "The GPU worker"'),
}


@pytest.mark.parametrize("name", sorted(MUTATIONS))
def test_each_rule_reports_a_broken_config(texts, name):
    edit, expected = MUTATIONS[name]
    config, changed = yaml.safe_load(texts["yaml_text"]), copy.deepcopy(texts)
    edit(config, changed)
    found = violations(config, **changed)
    assert any(expected in v for v in found), found


def test_workers_mount_the_instance_store_before_ray_starts():
    """The worker setup runs the instance-store script (standard library only, so before the
    project is installed), and env.sh then exports the folder it wrote."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    setup = config["worker_setup_commands"]
    script = "raysae/cluster/instance_store.py"
    assert any(script in c and c.startswith("python3 ") for c in setup)
    assert (ROOT / script).is_file()


def test_env_exports_the_instance_store_folder(tmp_path):
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    home = tmp_path / "home"
    (home / ".raysae").mkdir(parents=True)
    (home / ".raysae" / "cache_dir").write_text("/mnt/raysae/raysae\n")
    env = {"HOME": str(home), "PATH": os.environ["PATH"]}
    subprocess.run(["bash", "-c", config["setup_commands"][0]], env=env, check=True)
    out = subprocess.run(["bash", "-c", ". ~/.raysae/env.sh; echo $RAYSAE_CACHE_DIR"],
                         env=env, check=True, capture_output=True, text=True).stdout.strip()
    assert out == "/mnt/raysae/raysae"
