"""Conformance of eptrace's documents to the official ECS and OCSF definitions, which the project does not write.

- ECS: the field set of Elastic's npm package @elastic/ecs (its ecs_flat, read through node), pinned in
  tests/kernel/helpers/package.json. Rules: the field exists (or lives under labels.* / eptrace.*), the JSON
  type fits the ECS type, arrays only where ECS normalises to an array (and there always), allowed_values,
  expected_values, patterns and lowercase values, the event.category/event.type pairs, required fields,
  process.args starting with the absolute executable, custom names under eptrace.* (lower case, no data
  as keys), and network.community_id equal to what the reference implementation (PyPI communityid)
  computes for the document's flow.
- OCSF: the schema the OCSF server exports for the declared version, as bundled by PyPI ocsf-json-schema,
  turned into a JSON Schema by that package (required attributes, types, enums, profiles: an attribute of
  an undeclared profile is not allowed; class and object constraints) and validated with jsonschema; plus
  type_uid = class_uid*100 + activity_id, category_uid, and every enum caption sibling (status,
  activity_name, ...) equal to the caption of its id, and present when the id is 99 (Other).

Every problem is one line naming the field and the rule. `problems(doc)` picks ECS or OCSF by the document.
"""
from __future__ import annotations

import functools
import ipaddress
import json
import re
import subprocess
from pathlib import Path
from typing import Any, Iterable

REPO_ROOT = Path(__file__).resolve().parents[1]
ECS_PACKAGE = REPO_ROOT / "tests/kernel/helpers/node_modules/@elastic/ecs"
CUSTOM_ROOTS = ("labels", "eptrace")      # ECS custom fields: our own namespace, and labels

# --- ECS -------------------------------------------------------------------------------------------------

_ECS_TYPES: dict[str, tuple[type, ...]] = {
    **dict.fromkeys(("keyword", "constant_keyword", "wildcard", "text", "match_only_text", "version"), (str,)),
    **dict.fromkeys(("long", "integer", "short", "byte", "unsigned_long"), (int,)),
    **dict.fromkeys(("float", "half_float", "scaled_float", "double"), (int, float)),
    "boolean": (bool,), "date": (str,), "ip": (str,), "object": (dict,), "flattened": (dict,),
    "nested": (dict,), "geo_point": (dict, str, list),
}
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


@functools.lru_cache(maxsize=1)
def ecs_fields() -> dict[str, dict]:
    """ECS's flat field set from @elastic/ecs (read once per process through node)."""
    if not (ECS_PACKAGE / "package.json").is_file():
        raise RuntimeError(f"@elastic/ecs is not installed at {ECS_PACKAGE}: run `sudo make setup` "
                           f"(npm ci in tests/kernel/helpers)")
    script = f"process.stdout.write(JSON.stringify(require({json.dumps(str(ECS_PACKAGE))}).EcsFlat))"
    out = subprocess.run(["node", "-e", script], capture_output=True, text=True, check=True, timeout=60).stdout
    return json.loads(out)


@functools.lru_cache(maxsize=1)
def _ecs_required() -> tuple[str, ...]:
    return tuple(name for name, spec in ecs_fields().items() if spec.get("required"))


def ecs_version() -> str:
    return json.loads((ECS_PACKAGE / "package.json").read_text())["version"]


def _leaves(value: Any, path: str = "") -> Iterable[tuple[str, Any]]:
    """(dotted path, value) for every field; a list of objects yields its members' fields."""
    if isinstance(value, dict):
        for key, sub in value.items():
            yield from _leaves(sub, f"{path}.{key}" if path else key)
    elif isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
        for item in value:
            yield from _leaves(item, path)
    else:
        yield path, value


def _type_fits(ecs_type: str, value: Any) -> bool:
    allowed = _ECS_TYPES.get(ecs_type)
    if allowed is None:
        return True            # a type this checker does not know: no claim either way
    if isinstance(value, bool) and bool not in allowed:
        return False
    if not isinstance(value, allowed):
        return False
    if ecs_type == "date":
        return bool(_DATE.match(value))
    if ecs_type == "ip":
        try:
            ipaddress.ip_address(value)
        except ValueError:
            return False
    return True


def ecs_problems(doc: dict) -> list[str]:
    fields = ecs_fields()
    out: list[str] = []
    for path, value in _leaves(doc):
        root = path.split(".", 1)[0]
        if root in CUSTOM_ROOTS:
            if root == "labels" and not isinstance(value, str):
                out.append(f"{path}: labels are ECS keyword values, got {type(value).__name__}")
            continue
        spec = fields.get(path)
        if spec is None:
            out.append(f"{path}: not a field of ECS {ecs_version()} (custom fields go under eptrace.* or labels.*)")
            continue
        is_array = "array" in (spec.get("normalize") or [])
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not is_array:
            out.append(f"{path}: an array, where ECS expects one value")
        if is_array and not isinstance(value, list):
            out.append(f"{path}: one value, where ECS normalises to an array")
        for v in values:
            if not _type_fits(spec["type"], v):
                out.append(f"{path}: {v!r} does not fit ECS type {spec['type']}")
            if spec.get("allowed_values") and v not in {a["name"] for a in spec["allowed_values"]}:
                out.append(f"{path}: {v!r} is not among ECS allowed_values")
            if spec.get("expected_values") and v not in spec["expected_values"]:
                out.append(f"{path}: {v!r} is not among ECS expected_values {spec['expected_values']}")
            if spec.get("pattern") and isinstance(v, str) and not re.fullmatch(spec["pattern"], v):
                out.append(f"{path}: {v!r} does not match the ECS pattern {spec['pattern']}")
            if isinstance(v, str) and v != v.lower() and "normalized to lowercase" in spec.get("description", ""):
                out.append(f"{path}: {v!r}, ECS says the value must be normalized to lowercase")
    present = {path for path, _ in _leaves(doc)}
    out += [f"{name}: required by ECS, missing" for name in _ecs_required() if name not in present]
    out += _args_problems(doc.get("process"), "process")
    out += _custom_name_problems(doc.get("eptrace", {}), "eptrace")
    out += [f"labels.{k}: a label name holds no dots (ECS labels are flat)" for k in doc.get("labels", {}) if "." in k]
    out += _category_type_problems(doc, fields)
    out += community_id_problems(doc)
    return out


def _args_problems(process: Any, path: str) -> list[str]:
    """ECS process.args: "starting with the absolute path to the executable". eptrace's documented
    exception: argv as given when the executable is unknown or not absolute (README, Events)."""
    if not isinstance(process, dict) or not process.get("args"):
        return []
    executable, first = process.get("executable", ""), process["args"][0]
    if executable.startswith("/") and first != executable:
        return [f"{path}.args: starts with {first!r}, ECS wants the absolute executable {executable!r}"]
    return []


_CUSTOM_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def _custom_name_problems(value: Any, path: str) -> list[str]:
    """ECS custom-field guidelines: fixed lower-case names with underscores, never data used as a key."""
    out: list[str] = []
    items = value.items() if isinstance(value, dict) else ()
    for key, sub in items:
        if not _CUSTOM_NAME.match(key):
            out.append(f"{path}.{key}: custom field names are lower case with underscores (a value used as a key?)")
        out += _custom_name_problems(sub, f"{path}.{key}")
    for item in value if isinstance(value, list) else ():
        out += _custom_name_problems(item, path)
    return out


def _category_type_problems(doc: dict, fields: dict[str, dict]) -> list[str]:
    event = doc.get("event", {})
    categories, types = event.get("category") or [], event.get("type") or []
    expected = {a["name"]: set(a.get("expected_event_types") or ())
                for a in fields["event.category"]["allowed_values"]}
    return [f"event.type: {t!r} is not an expected_event_types value of event.category {c!r}"
            for c in categories if c in expected for t in types if t not in expected[c]]


def community_id_problems(doc: dict) -> list[str]:
    """network.community_id against the reference implementation, for the document's own tuple."""
    cid = doc.get("network", {}).get("community_id")
    if cid is None:
        return []
    import communityid                      # PyPI communityid, pinned in tests/requirements.txt
    src, dst, network = doc.get("source", {}), doc.get("destination", {}), doc.get("network", {})
    proto = int(network["iana_number"]) if "iana_number" in network else \
        {"tcp": 6, "udp": 17, "icmp": 1, "ipv6-icmp": 58, "sctp": 132}.get(network.get("transport", ""))
    if proto is None or "ip" not in src or "ip" not in dst:
        return ["network.community_id: present without the tuple that defines it (IPs and protocol)"]
    try:
        if proto in (1, 58):      # ping flows hash as echo request, both ways alike
            flow = communityid.FlowTuple(proto, src["ip"], dst["ip"], 8 if proto == 1 else 128, 0)
        else:
            flow = communityid.FlowTuple(proto, src["ip"], dst["ip"], src.get("port"), dst.get("port"))
        want = communityid.CommunityID().calc(flow)
    except communityid.error.FlowTupleError as e:
        return [f"network.community_id: the document's flow tuple is not valid ({e})"]
    return [] if cid == want else [f"network.community_id: {cid!r}, the reference implementation computes {want!r}"]


# --- OCSF ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=4)
def _ocsf_schema(version: str) -> dict:
    from ocsf_json_schema import get_ocsf_schema      # PyPI ocsf-json-schema: OCSF's exported schemas
    return get_ocsf_schema(version=version)


@functools.lru_cache(maxsize=64)
def _ocsf_validator(version: str, class_uid: int, profiles: tuple[str, ...]):
    import jsonschema
    from ocsf_json_schema import OcsfJsonSchemaEmbedded
    embedded = OcsfJsonSchemaEmbedded(_ocsf_schema(version))
    schema = embedded.get_class_schema(embedded.lookup_class_name_from_uid(class_uid), list(profiles))
    return jsonschema.Draft202012Validator(schema)


def ocsf_problems(doc: dict, version: str) -> list[str]:
    meta = doc.get("metadata", {})
    if meta.get("version") != version:
        return [f"metadata.version: {meta.get('version')!r}, the declared OCSF version is {version}"]
    schema = _ocsf_schema(version)
    classes = {c["uid"]: c for c in schema["classes"].values()}
    cls = classes.get(doc.get("class_uid"))
    if cls is None:
        return [f"class_uid: {doc.get('class_uid')!r} is not a class of OCSF {version}"]
    out: list[str] = []
    profiles = tuple(sorted(meta.get("profiles") or ()))
    for unknown in set(profiles) - set(schema.get("profiles", ())):
        out.append(f"metadata.profiles: {unknown!r} is not a profile of OCSF {version}")
    for err in _ocsf_validator(version, cls["uid"], tuple(p for p in profiles if p in schema.get("profiles", ()))) \
            .iter_errors(doc):
        where = ".".join(str(p) for p in err.absolute_path) or "(document)"
        out.append(f"{where}: {err.validator} rule: {err.message[:300]}")
    activity = doc.get("activity_id")
    if isinstance(activity, int) and doc.get("type_uid") != cls["uid"] * 100 + activity:
        out.append(f"type_uid: {doc.get('type_uid')!r}, must be class_uid*100 + activity_id = "
                   f"{cls['uid'] * 100 + activity}")
    if doc.get("category_uid") != cls.get("category_uid"):
        out.append(f"category_uid: {doc.get('category_uid')!r}, class {cls['name']} is in {cls.get('category_uid')}")
    out += _sibling_problems(doc, cls["attributes"], schema, "")
    return out


def _sibling_problems(obj: dict, attributes: dict, schema: dict, prefix: str) -> list[str]:
    """Enum captions: the sibling string of an enum id holds that id's caption (and is set for 99, Other)."""
    out: list[str] = []
    dictionary = schema["dictionary"]["attributes"]
    for name, value in obj.items():
        attr = attributes.get(name)
        if attr is None:
            continue                       # the JSON Schema reports unknown attributes
        path = f"{prefix}{name}"
        enum = attr.get("enum")
        sibling = attr.get("sibling") or dictionary.get(name, {}).get("sibling")
        if enum and sibling and isinstance(value, int):
            caption = enum.get(str(value), {}).get("caption")
            given = obj.get(sibling)
            if value == 99 and not given:
                out.append(f"{prefix}{sibling}: required with {path} 99 (Other), to say what the value is")
            elif value != 99 and given is not None and given != caption:
                out.append(f"{prefix}{sibling}: {given!r}, must be the caption of {path} {value}: {caption!r}")
        object_type = attr.get("object_type")
        if object_type and object_type in schema["objects"]:
            members = value if isinstance(value, list) else [value]
            for i, member in enumerate(members):
                if isinstance(member, dict):
                    sub = f"{path}.{i}." if isinstance(value, list) else f"{path}."
                    out += _sibling_problems(member, schema["objects"][object_type].get("attributes", {}),
                                             schema, sub)
    return out


# --- both ------------------------------------------------------------------------------------------------

def is_ocsf(doc: dict) -> bool:
    return "class_uid" in doc


def problems(doc: dict) -> list[str]:
    """Every conformance problem of one eptrace document (ECS, or OCSF by its metadata.version)."""
    if is_ocsf(doc):
        from tracer.schema.ocsf import OCSF_VERSION
        return ocsf_problems(doc, OCSF_VERSION)
    return ecs_problems(doc)


def check_documents(docs: Iterable[dict], where: str = "", limit: int = 20) -> str | None:
    """None when every document conforms; otherwise a report naming each field and rule (first `limit`)."""
    lines: list[str] = []
    for n, doc in enumerate(docs, 1):
        for p in problems(doc):
            action = (doc.get("event", {}).get("action") if not is_ocsf(doc)
                      else doc.get("unmapped", {}).get("event.action", doc.get("class_uid")))
            lines.append(f"{where}document {n} ({action}): {p}")
    if not lines:
        return None
    more = f"\n... and {len(lines) - limit} more" if len(lines) > limit else ""
    return "\n".join(lines[:limit]) + more


def shape(doc: dict) -> tuple:
    """What a document is made of: its kind of event and its field paths (not its values)."""
    action = doc.get("event", {}).get("action") or doc.get("unmapped", {}).get("event.action")
    return (doc.get("class_uid"), action, tuple(sorted(p for p, _ in _leaves(doc))))


def check_files(paths: Iterable[Path], texts: Iterable[str] = (), full: int = 5000) -> str | None:
    """Check every eptrace document (ECS or OCSF) in NDJSON files, and in NDJSON texts (a captured stdout);
    other lines (a receiver's own output, a traced command's) are not ours to check. Past the first `full`
    documents of a file, only documents of a shape not seen yet are checked: a storm of 100,000 identical
    flows costs what its first ones cost."""
    sources: list[tuple[str, str]] = []
    for path in sorted(set(paths)):
        try:
            sources.append((f"{path}: ", Path(path).read_text(errors="replace")))
        except OSError:
            continue
    sources += [(f"stdout {i + 1}: ", text) for i, text in enumerate(texts)]
    reports = []
    for where, text in sources:
        docs: list[dict] = []
        seen: set = set()
        for line in text.splitlines():
            if not line.startswith("{"):
                continue
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if not isinstance(doc, dict) or not ("ecs" in doc or "class_uid" in doc):
                continue
            if len(docs) >= full:
                if not seen:
                    seen = {shape(d) for d in docs}
                key = shape(doc)
                if key in seen:
                    continue
                seen.add(key)
            docs.append(doc)
        report = check_documents(docs, where=where)
        if report:
            reports.append(report)
    return "\n".join(reports) or None
