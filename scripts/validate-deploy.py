#!/usr/bin/env python3
"""Static checks for onrec's deployment artefacts.

Parses docker-compose.yml, every YAML file under deploy/, the Grafana dashboard JSON and
the Dockerfile, and checks that they agree with each other and with what the onrec binary
accepts and exports (settings, ports, health endpoints, metric names). Needs no Docker
engine and no cluster.

    python3 scripts/validate-deploy.py [REPO_ROOT]

Prints one line per check and `N passed, N failed` at the end; exits 1 if any check
failed, 2 if it could not run (PyYAML missing).
"""

from __future__ import annotations

import json
import re
import os
import sys
from pathlib import Path

try:
    import yaml
except ImportError:
    print("error: PyYAML is required: pip install pyyaml", file=sys.stderr)
    sys.exit(2)

try:
    import tomllib  # stdlib since Python 3.11
except ImportError:
    print("error: Python 3.11+ is required (for tomllib)", file=sys.stderr)
    sys.exit(2)


# --- What the onrec binary accepts and exports ---------------------------------------

# `onrec serve` settings: TOML key = flag name with `_`; env = ONREC_ + upper-case key.
# Read from the binary itself (`onrec serve --help`), so this list cannot fall behind.
# `segments` is the one setting that exists only in the TOML file.
def _serve_settings():
    import re
    import subprocess
    binary = os.environ.get("ONREC_BIN") or next(
        (p for p in ("target/debug/onrec", "target/release/onrec") if os.path.exists(p)), None
    )
    if binary is None:
        print("error: build onrec first (cargo build), or set ONREC_BIN", file=sys.stderr)
        sys.exit(2)
    help_text = subprocess.run([binary, "serve", "--help"], capture_output=True, text=True, check=True).stdout
    flags = set(re.findall(r"--([a-z][a-z0-9-]+)", help_text)) - {"help", "config"}
    return {f.replace("-", "_") for f in flags} | {"segments"}


KNOWN_KEYS = _serve_settings()
# Secrets come from a Secret via env, never from the ConfigMap.
SECRET_KEYS = {"write_api_keys", "read_api_keys"}
KNOWN_ENV = {"ONREC_" + k.upper() for k in KNOWN_KEYS}

HISTOGRAMS = {
    "onrec_request_duration_seconds", "onrec_bandit_store_latency_seconds",
    "onrec_learn_feedback_to_publish_seconds",
}
METRICS = {
    "onrec_requests_total", "onrec_events_total", "onrec_catalog_items",
    "onrec_users_tracked", "onrec_inflight_requests", "onrec_model_info",
    "onrec_build_info",
    "onrec_bandit_decisions_total", "onrec_bandit_reward_total", "onrec_bandit_fallbacks_total",
    "onrec_bandit_store_errors_total", "onrec_bandit_store_buffered_updates",
    "onrec_bandit_store_dropped_updates_total", "onrec_bandit_updates_dropped_total",
    "onrec_learn_transitions_total", "onrec_learn_transitions_dropped_total",
    "onrec_learn_updates_total", "onrec_learn_loss", "onrec_learn_td_error", "onrec_learn_q_mean",
    "onrec_learn_weights_version", "onrec_learn_replay_size", "onrec_learn_items",
    "onrec_decision_log_records_total", "onrec_decision_log_write_errors_total",
    "onrec_decision_log_dropped_total",
} | {h + s for h in HISTOGRAMS for s in ("_bucket", "_sum", "_count")}

HTTP_PORT = 8080
GRPC_PORT = 50051

COMPOSE_SERVICES = {"onrec", "onrec-learner", "lb", "redis", "prometheus", "grafana"}


# --- Reporting ------------------------------------------------------------------------

class Report:
    def __init__(self) -> None:
        self.passed = 0
        self.failed = 0

    def check(self, ok: bool, name: str, detail: str = "") -> bool:
        if ok:
            self.passed += 1
            print(f"PASS  {name}")
        else:
            self.failed += 1
            print(f"FAIL  {name}" + (f": {detail}" if detail else ""))
        return ok


def rel(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def load_yaml_docs(path: Path, root: Path, r: Report) -> list | None:
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except (OSError, yaml.YAMLError) as e:
        r.check(False, f"{rel(path, root)} parses as YAML", str(e).replace("\n", " "))
        return None
    r.check(bool(docs), f"{rel(path, root)} parses as YAML", "file has no documents")
    return docs


# --- PromQL ---------------------------------------------------------------------------

_PROMQL_KEYWORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
    "unless", "offset", "atan2", "inf", "nan",
}


def promql_metric_names(expr: str) -> set[str]:
    """Metric names an expression selects: identifiers that are not functions, keywords,
    label names (inside {} or grouping clauses), strings or durations."""
    s = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^{}]*\}", " ", s)  # label matchers
    s = re.sub(r"\[[^\[\]]*\]", " ", s)  # range / subquery selectors
    s = re.sub(
        r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)", " ", s
    )
    names = set()
    for m in re.finditer(r"(?<![\w:.$])[A-Za-z_:][\w:]*", s):
        word = m.group(0)
        rest = s[m.end():].lstrip()
        if rest.startswith("("):  # function call
            continue
        if word.lower() in _PROMQL_KEYWORDS:
            continue
        names.add(word)
    return names


def variable_query_promql(query: str) -> str | None:
    """The PromQL inside a Grafana Prometheus variable query, or None if it has none."""
    q = query.strip()
    m = re.fullmatch(r"label_values\((.*),\s*[A-Za-z_]\w*\s*\)", q, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"label_values\(\s*[A-Za-z_]\w*\s*\)", q):
        return None
    m = re.fullmatch(r"query_result\((.*)\)", q, re.S)
    if m:
        return m.group(1)
    if re.fullmatch(r"(label_names|metrics)\(.*\)", q, re.S):
        return None
    return q


def walk_panels(panels: list) -> list:
    out = []
    for p in panels or []:
        out.append(p)
        out.extend(walk_panels(p.get("panels", [])))
    return out


# --- Checks ---------------------------------------------------------------------------

def check_dockerfile(root: Path, r: Report) -> None:
    path = root / "Dockerfile"
    if not r.check(path.is_file(), "Dockerfile exists"):
        return
    lines = [l.strip() for l in path.read_text().splitlines()]
    lines = [l for l in lines if l and not l.startswith("#")]
    froms = [l for l in lines if re.match(r"(?i)^FROM\s", l)]
    r.check(len(froms) >= 2, "Dockerfile has at least two FROM stages",
            f"found {len(froms)}")
    last_stage = lines[max(i for i, l in enumerate(lines) if re.match(r"(?i)^FROM\s", l)):] \
        if froms else []
    users = [l.split(None, 1)[1] for l in last_stage if re.match(r"(?i)^USER\s", l)]
    r.check(bool(users) and users[-1].split(":")[0] not in ("0", "root"),
            "Dockerfile runtime stage runs as a non-root USER",
            f"USER lines: {users or 'none'}")
    exposed = set()
    for l in last_stage:
        if re.match(r"(?i)^EXPOSE\s", l):
            exposed |= {int(p.split("/")[0]) for p in l.split()[1:]}
    r.check({HTTP_PORT, GRPC_PORT} <= exposed,
            f"Dockerfile EXPOSEs {HTTP_PORT} and {GRPC_PORT}", f"EXPOSE {sorted(exposed)}")
    envs = set(re.findall(r"\b(ONREC_[A-Z0-9_]+)=", path.read_text()))
    unknown = envs - KNOWN_ENV
    r.check(not unknown, "Dockerfile sets only known ONREC_* variables",
            f"unknown: {sorted(unknown)}")
    di = root / ".dockerignore"
    ignored = di.read_text().split() if di.is_file() else []
    r.check(any(x.strip("/") in ("target", "**/target") for x in ignored),
            ".dockerignore excludes target/")


def compose_ports(service: dict) -> set[int]:
    """Container-side ports a compose service publishes (short and long syntax)."""
    out = set()
    for p in service.get("ports", []) or []:
        if isinstance(p, dict):
            if "target" in p:
                out.add(int(p["target"]))
            continue
        spec = str(p).split("/")[0]
        target = spec.rsplit(":", 1)[-1]
        if "-" in target:
            lo, hi = target.split("-")
            out |= set(range(int(lo), int(hi) + 1))
        elif target.isdigit():
            out.add(int(target))
    return out


def compose_env_names(service: dict) -> set[str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return {str(e).split("=", 1)[0] for e in env}
    return set(env)


def check_compose(root: Path, r: Report) -> dict:
    path = root / "docker-compose.yml"
    if not r.check(path.is_file(), "docker-compose.yml exists"):
        return {}
    docs = load_yaml_docs(path, root, r)
    if not docs:
        return {}
    compose = docs[0]
    services = compose.get("services") or {}
    missing = COMPOSE_SERVICES - set(services)
    r.check(not missing, "compose defines onrec, onrec-learner, lb, redis, prometheus and grafana",
            f"missing: {sorted(missing)}")
    onrec = services.get("onrec") or {}
    learner = services.get("onrec-learner") or {}
    lb = services.get("lb") or {}
    ports = compose_ports(lb)
    r.check({HTTP_PORT, GRPC_PORT} <= ports,
            f"compose lb publishes {HTTP_PORT} and {GRPC_PORT}", f"ports: {sorted(ports)}")
    command = [str(x) for x in onrec.get("command", []) or []]
    r.check(command[:1] == ["serve"] and "--role" in command
            and command[command.index("--role") + 1:][:1] == ["serve"],
            "compose onrec runs serve replicas (serve --role serve)", f"command: {command}")
    replicas = ((onrec.get("deploy") or {}).get("replicas"))
    r.check(isinstance(replicas, int) and replicas >= 3, "compose runs at least 3 serve replicas",
            f"deploy.replicas: {replicas}")
    r.check([str(x) for x in learner.get("command", []) or []][:1] == ["learn"],
            "compose onrec-learner runs onrec learn", f"command: {learner.get('command')}")
    for name, svc in (("onrec", onrec), ("onrec-learner", learner)):
        env = {e for e in compose_env_names(svc) if e.startswith("ONREC_")}
        unknown = env - KNOWN_ENV
        r.check(not unknown, f"compose {name} sets only known ONREC_* variables",
                f"unknown: {sorted(unknown)}")
        r.check("ONREC_REDIS_URL" in env, f"compose {name} sets ONREC_REDIS_URL")
    conf_path = root / "deploy/nginx/nginx.conf"
    if r.check(conf_path.is_file(), "deploy/nginx/nginx.conf exists"):
        conf = conf_path.read_text()
        r.check(f"server onrec:{HTTP_PORT}" in conf and f"server onrec:{GRPC_PORT}" in conf,
                "nginx balances over the onrec replicas' HTTP and gRPC ports")
        r.check(f"listen {HTTP_PORT};" in conf and f"listen {GRPC_PORT};" in conf
                and "grpc_pass" in conf, "nginx listens on both ports and passes gRPC")
        r.check("/etc/nginx/nginx.conf" in " ".join(str(v) for v in lb.get("volumes", []) or []),
                "compose mounts the nginx configuration into lb")
    # Every bind-mounted file or folder must exist in the repository.
    missing_src = []
    for name, svc in services.items():
        for v in (svc or {}).get("volumes", []) or []:
            src = v.get("source") if isinstance(v, dict) else str(v).split(":")[0]
            if src and src.startswith((".", "/")) and not (root / src).exists():
                missing_src.append(f"{name}: {src}")
    r.check(not missing_src, "compose bind mounts point at existing paths",
            ", ".join(missing_src))
    return compose


def check_prometheus(root: Path, r: Report) -> None:
    path = root / "deploy/prometheus/prometheus.yml"
    if not r.check(path.is_file(), "deploy/prometheus/prometheus.yml exists"):
        return
    docs = yaml.safe_load(path.read_text()) or {}
    found = []
    for job in docs.get("scrape_configs", []) or []:
        targets = {t for sc in job.get("static_configs", []) or []
                   for t in sc.get("targets", []) or []}
        for sd in job.get("dns_sd_configs", []) or []:
            if sd.get("port") == HTTP_PORT:
                targets |= {f"{n}:{HTTP_PORT}" for n in sd.get("names", []) or []}
        if {f"onrec:{HTTP_PORT}", f"onrec-learner:{HTTP_PORT}"} <= targets:
            found.append(job)
    ok = any(j.get("metrics_path", "/metrics") == "/metrics" for j in found)
    r.check(ok, f"prometheus scrapes the replicas and the learner on {HTTP_PORT}/metrics",
            "no scrape job with targets onrec:8080 and onrec-learner:8080 and metrics_path /metrics")


def check_grafana_provisioning(root: Path, compose: dict, r: Report) -> None:
    ds_path = root / "deploy/grafana/provisioning/datasources/prometheus.yml"
    if r.check(ds_path.is_file(), "grafana datasource provisioning exists"):
        ds = (yaml.safe_load(ds_path.read_text()) or {}).get("datasources", []) or []
        ok = any(d.get("type") == "prometheus" and d.get("uid") == "prometheus"
                 and d.get("url") == "http://prometheus:9090" for d in ds)
        r.check(ok, "grafana datasource: prometheus at http://prometheus:9090, uid prometheus")
    db_path = root / "deploy/grafana/provisioning/dashboards/onrec.yml"
    if r.check(db_path.is_file(), "grafana dashboard provider exists"):
        provs = (yaml.safe_load(db_path.read_text()) or {}).get("providers", []) or []
        paths = {(p.get("options") or {}).get("path") for p in provs if p.get("type") == "file"}
        mounts = {str(v).split(":")[1] for v in
                  ((compose.get("services") or {}).get("grafana") or {}).get("volumes", [])
                  if ":" in str(v)}
        r.check("/var/lib/grafana/dashboards" in paths,
                "grafana file provider reads /var/lib/grafana/dashboards")
        r.check("/var/lib/grafana/dashboards" in mounts,
                "compose mounts the dashboards at /var/lib/grafana/dashboards")


def check_dashboard(root: Path, r: Report) -> None:
    path = root / "deploy/grafana/dashboards/onrec.json"
    if not r.check(path.is_file(), "grafana dashboard onrec.json exists"):
        return
    try:
        dash = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        r.check(False, "onrec.json parses as JSON", str(e))
        return
    r.check(True, "onrec.json parses as JSON")
    panels = walk_panels(dash.get("panels", []))
    ids = [p.get("id") for p in panels]
    r.check(len(ids) == len(set(ids)) and None not in ids, "dashboard panel ids are unique")

    exprs = []  # (where, promql)
    for p in panels:
        for t in p.get("targets", []) or []:
            if "expr" in t:
                exprs.append((f"panel '{p.get('title')}'", t["expr"]))
    for v in (dash.get("templating") or {}).get("list", []) or []:
        if v.get("type") != "query":
            continue
        q = v.get("query")
        q = q.get("query", "") if isinstance(q, dict) else (q or "")
        promql = variable_query_promql(q)
        if promql is not None:
            exprs.append((f"variable '{v.get('name')}'", promql))
    r.check(bool(exprs), "dashboard has PromQL queries", "none found")

    bad, used = [], set()
    for where, e in exprs:
        names = promql_metric_names(e)
        used |= names
        unknown = names - METRICS
        if unknown or not names:
            bad.append(f"{where}: {sorted(unknown) or 'no metric'}")
    r.check(not bad, f"all {len(exprs)} PromQL queries use only onrec's metrics",
            "; ".join(bad))
    def family(name: str) -> str:
        for h in HISTOGRAMS:
            if name.startswith(h + "_"):
                return h
        return name
    unused = sorted({family(m) for m in METRICS} - {family(u) for u in used})
    r.check(not unused, "dashboard shows every onrec metric", f"unused: {unused}")
    hq = [e for _, e in exprs if "histogram_quantile" in e]
    r.check(bool(hq) and all("_bucket" in e and re.search(r"\ble\b", e) for e in hq),
            "latency quantiles use histogram_quantile over _bucket by le")


def container_port_map(container: dict) -> dict:
    out = {}
    for p in container.get("ports", []) or []:
        out[p.get("containerPort")] = p
        if p.get("name"):
            out[p["name"]] = p
    return out


def resolve_port(port, ports: dict):
    """containerPort a probe/targetPort refers to, or None."""
    p = ports.get(port)
    return p.get("containerPort") if p else None


def check_kubernetes(root: Path, r: Report) -> None:
    kdir = root / "deploy/kubernetes"
    if not r.check(kdir.is_dir(), "deploy/kubernetes exists"):
        return
    objs = {}  # (kind, name) -> doc
    kustomization = None
    for path in sorted(kdir.glob("*.y*ml")):
        for doc in load_yaml_docs(path, root, r) or []:
            name = (doc.get("metadata") or {}).get("name")
            kind = doc.get("kind")
            if kind == "Kustomization":
                kustomization = (path, doc)
                r.check(bool(doc.get("apiVersion")), f"{path.name}: Kustomization has apiVersion")
                continue
            r.check(bool(doc.get("apiVersion") and kind and name),
                    f"{path.name}: {kind or '?'}/{name or '?'} has apiVersion, kind, metadata.name")
            if path.name != "secret.example.yaml":
                objs[(kind, name)] = doc

    if r.check(kustomization is not None, "kustomization.yaml exists"):
        _, k = kustomization
        res = k.get("resources", []) or []
        missing = [x for x in res if not (kdir / x).exists()]
        r.check(not missing, "kustomization resources exist", f"missing: {missing}")
        r.check("secret.example.yaml" not in res,
                "kustomization does not include the example Secret")
        listed = {p.name for p in kdir.glob("*.y*ml")} - {"kustomization.yaml",
                                                          "secret.example.yaml"}
        r.check(listed <= set(res), "kustomization lists every manifest",
                f"not listed: {sorted(listed - set(res))}")

    dep = objs.get(("Deployment", "onrec"))
    if not r.check(dep is not None, "Deployment onrec exists"):
        return
    pod = dep["spec"]["template"]["spec"]
    containers = pod.get("containers", [])
    c = next((x for x in containers if x.get("name") == "onrec"), containers[0] if containers else {})
    ports = container_port_map(c)
    r.check(resolve_port("http", ports) == HTTP_PORT and resolve_port("grpc", ports) == GRPC_PORT,
            f"Deployment declares ports http {HTTP_PORT} and grpc {GRPC_PORT}")

    for probe, want in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz"),
                        ("startupProbe", "/healthz")):
        hg = (c.get(probe) or {}).get("httpGet") or {}
        ok = hg.get("path") == want and resolve_port(hg.get("port"), ports) == HTTP_PORT
        r.check(ok, f"Deployment {probe} GETs {want} on the http port",
                f"got path={hg.get('path')} port={hg.get('port')}")

    env = {e.get("name"): e for e in c.get("env", []) or []}
    unknown = {n for n in env if n and n.startswith("ONREC_")} - KNOWN_ENV
    r.check(not unknown, "Deployment sets only known ONREC_* variables",
            f"unknown: {sorted(unknown)}")
    ref = ((env.get("ONREC_WRITE_API_KEYS") or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    r.check(ref.get("name") == "onrec-api-keys" and ref.get("key") == "write",
            "Deployment takes ONREC_WRITE_API_KEYS from Secret onrec-api-keys/write")

    ctx = {**(pod.get("securityContext") or {}), **(c.get("securityContext") or {})}
    r.check(ctx.get("runAsNonRoot") is True and ctx.get("runAsUser") == 10001
            and ctx.get("readOnlyRootFilesystem") is True,
            "Deployment runs as non-root uid 10001 with a read-only root filesystem")
    grace = pod.get("terminationGracePeriodSeconds", 30)
    pre_stop = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
    r.check(isinstance(pre_stop, int) and pre_stop > 0,
            "Deployment waits in a preStop sleep while the endpoints drop the pod",
            f"preStop sleep {pre_stop}")
    pre_stop = pre_stop if isinstance(pre_stop, int) else 0

    # Config file: the --config path must lie in a mount of ConfigMap onrec-config.
    args = c.get("args", []) or []
    cfg_path = args[args.index("--config") + 1] if "--config" in args[:-1] else None
    vols = {v["name"]: v for v in pod.get("volumes", []) or []}
    mounted = False
    for m in c.get("volumeMounts", []) or []:
        v = vols.get(m.get("name"), {})
        if (v.get("configMap") or {}).get("name") == "onrec-config" and cfg_path \
                and cfg_path.startswith(m["mountPath"].rstrip("/") + "/"):
            mounted = (objs.get(("ConfigMap", "onrec-config")) or {}).get("data", {}) \
                .get(cfg_path[len(m["mountPath"].rstrip("/")) + 1:]) is not None
    r.check(mounted, "Deployment --config points into the mounted ConfigMap onrec-config",
            f"--config {cfg_path}")

    cm = objs.get(("ConfigMap", "onrec-config"))
    if r.check(cm is not None and "onrec.toml" in (cm.get("data") or {}),
               "ConfigMap onrec-config has key onrec.toml"):
        try:
            conf = tomllib.loads(cm["data"]["onrec.toml"])
            r.check(True, "onrec.toml parses as TOML")
        except tomllib.TOMLDecodeError as e:
            r.check(False, "onrec.toml parses as TOML", str(e))
            conf = None
        if conf is not None:
            unknown = set(conf) - KNOWN_KEYS
            r.check(not unknown, "onrec.toml uses only known keys", f"unknown: {sorted(unknown)}")
            leaked = set(conf) & SECRET_KEYS
            r.check(not leaked, "onrec.toml holds no API keys", f"found: {sorted(leaked)}")
            grace_s = parse_seconds(conf.get("shutdown_grace", "30s"))
            drain_s = parse_seconds(conf.get("drain_delay", "5s"))
            r.check(grace_s is not None and drain_s is not None
                    and pre_stop + drain_s + grace_s < grace,
                    "preStop + drain_delay + shutdown_grace is shorter than terminationGracePeriodSeconds",
                    f"{pre_stop}s + {conf.get('drain_delay')} + {conf.get('shutdown_grace')} vs {grace}s")
            for key, port in (("http_addr", HTTP_PORT), ("grpc_addr", GRPC_PORT)):
                if key in conf:
                    r.check(str(conf[key]).rsplit(":", 1)[-1] == str(port),
                            f"onrec.toml {key} listens on {port}", str(conf[key]))

    svc = objs.get(("Service", "onrec"))
    if r.check(svc is not None, "Service onrec exists"):
        spec = svc.get("spec", {})
        bad = [str(p.get("targetPort", p.get("port"))) for p in spec.get("ports", [])
               if resolve_port(p.get("targetPort", p.get("port")), ports) is None]
        r.check(not bad, "Service targets ports the Deployment declares", f"unknown: {bad}")
        labels = dep["spec"]["template"]["metadata"].get("labels", {})
        sel = spec.get("selector") or {}
        r.check(bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
                "Service selector matches the pod labels")
        grpc = [p for p in spec.get("ports", []) if resolve_port(p.get("targetPort"), ports) == GRPC_PORT]
        r.check(bool(grpc) and grpc[0].get("appProtocol") == "grpc",
                "Service grpc port has appProtocol grpc")

    args = [str(a) for a in c.get("args", []) or []]
    r.check("--role" in args and args[args.index("--role") + 1:][:1] == ["serve"],
            "Deployment onrec runs serve replicas (--role serve)", f"args: {args}")
    labels = ((dep["spec"]["template"].get("metadata") or {}).get("labels")) or {}

    learner = objs.get(("Deployment", "onrec-learner"))
    if r.check(learner is not None, "Deployment onrec-learner exists"):
        spec = learner["spec"]
        lpod = spec["template"]["spec"]
        lc = (lpod.get("containers") or [{}])[0]
        r.check(spec.get("replicas") == 1, "the learner runs one replica",
                f"replicas: {spec.get('replicas')}")
        r.check((spec.get("strategy") or {}).get("type") == "Recreate",
                "the learner is replaced with Recreate")
        r.check([str(a) for a in lc.get("args", []) or []][:1] == ["learn"],
                "the learner runs onrec learn", f"args: {lc.get('args')}")
        llabels = ((spec["template"].get("metadata") or {}).get("labels")) or {}
        svc_sel = (((objs.get(("Service", "onrec")) or {}).get("spec") or {}).get("selector")) or {}
        r.check(bool(svc_sel) and not all(llabels.get(k) == v for k, v in svc_sel.items()),
                "the Service does not send traffic to the learner")

    pdb = next((d for (k, _), d in objs.items() if k == "PodDisruptionBudget"), None)
    if r.check(pdb is not None, "PodDisruptionBudget exists"):
        sel = ((pdb["spec"].get("selector") or {}).get("matchLabels")) or {}
        r.check(bool(sel) and all(labels.get(k) == v for k, v in sel.items()),
                "the PodDisruptionBudget covers the serve replicas", f"selector: {sel}")

    cm = objs.get(("ConfigMap", "onrec-config")) or {}
    try:
        redis_url = tomllib.loads((cm.get("data") or {}).get("onrec.toml", "")).get("redis_url")
    except tomllib.TOMLDecodeError:
        redis_url = None
    r.check(bool(redis_url), "onrec.toml sets redis_url (serve and learn need it)")
    if redis_url and "onrec-redis" in redis_url:
        r.check(("StatefulSet", "onrec-redis") in objs and ("Service", "onrec-redis") in objs,
                "redis.yaml provides the onrec-redis StatefulSet and Service redis_url names")

    hpa = next((d for (k, _), d in objs.items() if k == "HorizontalPodAutoscaler"), None)
    if r.check(hpa is not None, "HorizontalPodAutoscaler exists"):
        ref = hpa["spec"].get("scaleTargetRef", {})
        r.check(ref.get("kind") == "Deployment" and ref.get("name") == "onrec",
                "HPA scales Deployment onrec")
        cpu_req = ((c.get("resources") or {}).get("requests") or {}).get("cpu")
        r.check(cpu_req is not None, "Deployment requests CPU (needed for HPA utilization)")


def parse_seconds(s) -> float | None:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*", str(s))
    if not m:
        return None
    return float(m.group(1)) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def main() -> int:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parent.parent
    r = Report()

    # Every YAML file under deploy/ must parse (the detailed checks re-read what they need).
    for path in sorted((root / "deploy").rglob("*.y*ml")):
        if (root / "deploy/kubernetes") not in path.parents:  # checked with k8s below
            load_yaml_docs(path, root, r)

    check_dockerfile(root, r)
    compose = check_compose(root, r)
    check_prometheus(root, r)
    check_grafana_provisioning(root, compose, r)
    check_dashboard(root, r)
    check_kubernetes(root, r)

    print(f"{r.passed} passed, {r.failed} failed")
    return 1 if r.failed else 0


if __name__ == "__main__":
    sys.exit(main())
