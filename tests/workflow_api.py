"""UI-format ComfyUI workflows (what the frontend saves, what ``example_workflows/`` holds) to API format.

Test helper (not a test module). ``to_api(workflow, object_info)`` gives the ``{node_id: {"class_type",
"inputs"}}`` dict that ``POST /prompt`` takes, the way ComfyUI's frontend 1.2x/1.3x builds it
(``graphToPrompt`` in ``src/utils/executionUtil.ts``):

* Widget values. A saved node has ``widgets_values``: one value per widget, in the order the frontend
  created the widgets, which is the node's ``input_order`` from ``/object_info`` (required, then
  optional, then anything not listed), keeping only inputs that have a widget: INT, FLOAT, BOOLEAN,
  STRING, COMBO (a list spec, or ``"COMBO"`` with ``options`` for V3 nodes) and the frontend's other
  widget types, unless ``forceInput`` is set; ``widgetType`` overrides the type. Link-only types
  (MODEL, CLIP, ...) have no value. Some widgets are followed by values that are not inputs:
  an INT whose spec has ``control_after_generate`` (or, without that key, is named ``seed`` /
  ``noise_seed``) by the ``control_after_generate`` value ("fixed", "increment", "decrement" or
  "randomize"; workflows saved before those modes existed hold ``true``/``false`` there, which the frontend
  still loads as "randomize"/"fixed", and templates still ship them, e.g. comfyui-workflow-templates 0.1.95's
  default.json); a COMBO with ``control_after_generate`` by that and a ``control_filter_list`` string; and a
  node with an image / video upload combo gets an ``upload`` widget last. Those are skipped. A linked widget input takes the
  link instead of its value (its value is still in ``widgets_values``, so the order is unchanged).
* Nodes with mode 2 (muted, "never") are left out and inputs linked to them dropped; mode 4
  (bypassed) nodes are left out and a link from one of their outputs is followed through their first
  input of the same type (the slot with the same index first), as the frontend does.
* UI-only (virtual) nodes are left out: Note and MarkdownNote; Reroute is followed through;
  PrimitiveNode (which has no inputs) leaves the target's own widget value in place.
* List values are wrapped as ``{"__value__": [...]}`` as the frontend does (lists mean links).

Subgraphs and legacy group nodes are not expanded (``UnsupportedWorkflow``). ``check_ui_workflow``
lists structural problems of a UI workflow (links that disagree with node slots, wrong types, a
``widgets_values`` of the wrong length for the node's current definition), so a template that the
frontend would load with shifted widget values fails a test.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Mapping

# Widget constructors of the frontend (src/scripts/widgets.ts, ComfyWidgets); extensions can add more.
WIDGET_TYPES = frozenset({"INT", "FLOAT", "BOOLEAN", "STRING", "COMBO", "MARKDOWN", "IMAGEUPLOAD", "COLOR",
                          "IMAGECOMPARE", "CHART", "GALLERIA", "TEXTAREA"})
# Frontend-only node types: never sent to the server.
NOTE_TYPES = frozenset({"Note", "MarkdownNote"})
REROUTE_TYPES = frozenset({"Reroute"})
PRIMITIVE_TYPES = frozenset({"PrimitiveNode"})
VIRTUAL_TYPES = NOTE_TYPES | REROUTE_TYPES | PRIMITIVE_TYPES
MODE_ALWAYS, MODE_NEVER, MODE_BYPASS = 0, 2, 4
# Values in widgets_values that are not inputs, as widget_layout marks them.
CONTROL, FILTER, UPLOAD = "<control>", "<filter>", "<upload>"
# The control_after_generate modes (the frontend's valueControl combo).
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")
# What the frontend's workflow schema (zComfyNode in workflowSchema.ts) requires of every node.
NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")
_UPLOAD_FLAGS = ("image_upload", "video_upload", "animated_image_upload")


class UnsupportedWorkflow(ValueError):
    """The workflow uses something this converter does not handle (subgraphs, group nodes)."""


class UnknownNodeType(KeyError):
    """A node type that the server's /object_info does not list."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


# -- node definitions ---------------------------------------------------------------------------------

def input_type(spec: Any) -> str:
    """The type of an /object_info input spec: ``"COMBO"`` for both combo encodings."""
    head = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    if isinstance(head, (list, tuple)):
        return "COMBO"
    return str(head)


def input_options(spec: Any) -> dict:
    if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict):
        return spec[1]
    return {}


def combo_options(spec: Any) -> list:
    """The choices of a combo spec: ``[[...], {...}]`` (classic) or ``["COMBO", {"options": [...]}]`` (V3)."""
    head = spec[0] if isinstance(spec, (list, tuple)) and spec else None
    if isinstance(head, (list, tuple)):
        return list(head)
    return list(input_options(spec).get("options") or [])


def ordered_inputs(node_info: Mapping) -> list[tuple[str, Any, bool]]:
    """[(name, spec, optional)] in the frontend's order: input_order required, input_order optional, rest."""
    sections = node_info.get("input") or {}
    required = sections.get("required") or {}
    optional = sections.get("optional") or {}
    order = node_info.get("input_order") or {}
    out, seen = [], set()
    for names, specs, is_opt in ((order.get("required") or [], required, False),
                                 (order.get("optional") or [], optional, True)):
        for name in names:
            if name in specs and name not in seen:
                out.append((name, specs[name], is_opt))
                seen.add(name)
    for specs, is_opt in ((required, False), (optional, True)):
        for name, spec in specs.items():
            if name not in seen:
                out.append((name, spec, is_opt))
                seen.add(name)
    return out


def is_widget(spec: Any, extra_widget_types: Iterable[str] = ()) -> bool:
    opts = input_options(spec)
    if opts.get("forceInput"):
        return False
    kind = opts.get("widgetType") or input_type(spec)
    return kind in WIDGET_TYPES or kind in set(extra_widget_types)


def extra_values_after(name: str, spec: Any) -> int:
    """How many non-input widget values the frontend puts after this widget's value."""
    kind, opts = input_type(spec), input_options(spec)
    if kind == "INT":
        control = opts.get("control_after_generate")
        if control is None:  # legacy convention (useIntWidget.ts)
            control = name in ("seed", "noise_seed")
        return 1 if control else 0
    if kind == "COMBO" and opts.get("control_after_generate"):
        return 2  # control_after_generate + control_filter_list (addValueControlWidgets)
    return 0


def is_control_value(value: Any) -> bool:
    """Whether a saved control_after_generate value is one the frontend loads: a mode, or a legacy boolean."""
    return isinstance(value, bool) or (isinstance(value, str) and value in CONTROL_MODES)


def widget_layout(node_info: Mapping, extra_widget_types: Iterable[str] = ()) -> list[tuple[str | None, Any]]:
    """One entry per value in ``widgets_values``: (input name, spec), or (None, CONTROL / FILTER / UPLOAD) for
    a value that is not an input (seed control, combo filter, upload button)."""
    layout: list[tuple[str | None, Any]] = []
    upload = False
    for name, spec, _opt in ordered_inputs(node_info):
        if not is_widget(spec, extra_widget_types):
            continue
        layout.append((name, spec))
        layout += [(None, CONTROL), (None, FILTER)][:extra_values_after(name, spec)]
        if not _opt and input_type(spec) == "COMBO" and any(input_options(spec).get(f) for f in _UPLOAD_FLAGS):
            upload = True
    if upload:  # Comfy.UploadImage adds required["upload"]; not in input_order, so it comes last
        layout.append((None, UPLOAD))
    return layout


def default_value(spec: Any) -> Any:
    opts = input_options(spec)
    if "default" in opts:
        return opts["default"]
    kind = input_type(spec)
    if kind == "COMBO":
        choices = combo_options(spec)
        return choices[0] if choices else None
    return {"INT": 0, "FLOAT": 0.0, "BOOLEAN": False, "STRING": ""}.get(kind)


def widget_values(node: Mapping, node_info: Mapping, extra_widget_types: Iterable[str] = ()) -> dict[str, Any]:
    """{input name: value} from a saved node's ``widgets_values`` (list, or a dict keyed by widget name)."""
    layout = widget_layout(node_info, extra_widget_types)
    saved = node.get("widgets_values")
    out: dict[str, Any] = {}
    if isinstance(saved, dict):
        for name, spec in layout:
            if name is not None:
                out[name] = saved[name] if name in saved else default_value(spec)
        return out
    saved = list(saved or [])
    for i, (name, spec) in enumerate(layout):
        if name is not None:
            out[name] = saved[i] if i < len(saved) else default_value(spec)
    return out


# -- graph --------------------------------------------------------------------------------------------

def _links(workflow: Mapping) -> dict[int, tuple[int, int, int, int, str]]:
    """link id -> (origin node, origin slot, target node, target slot, type), for both link encodings."""
    out = {}
    for link in workflow.get("links") or []:
        if isinstance(link, dict):
            out[int(link["id"])] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                                    link.get("type"))
        else:
            lid, o_id, o_slot, t_id, t_slot, ltype = link[:6]
            out[int(lid)] = (o_id, o_slot, t_id, t_slot, ltype)
    return out


def _types_match(a: Any, b: Any) -> bool:
    """LiteGraph.isValidConnection, simplified: '*'/'' match anything; comma lists match if they share a type."""
    a, b = str(a or "*"), str(b or "*")
    if a in ("*", "") or b in ("*", "") or a == b:
        return True
    return bool({t.strip().upper() for t in a.split(",")} & {t.strip().upper() for t in b.split(",")})


def _check_supported(workflow: Mapping) -> None:
    subgraphs = {sg.get("id") for sg in ((workflow.get("definitions") or {}).get("subgraphs") or [])}
    group_nodes = set(((workflow.get("extra") or {}).get("groupNodes") or {}))
    for node in workflow.get("nodes") or []:
        t = str(node.get("type"))
        if t in subgraphs:
            raise UnsupportedWorkflow(f"node {node.get('id')} is a subgraph ({t}); subgraphs are not expanded")
        if t.startswith(("workflow>", "workflow/")) or t in group_nodes:
            raise UnsupportedWorkflow(f"node {node.get('id')} is a legacy group node ({t}); not expanded")


def node_types(workflow: Mapping) -> set[str]:
    """Every node type the workflow uses, UI-only ones included."""
    return {str(n["type"]) for n in workflow.get("nodes") or []}


def missing_node_types(workflow: Mapping, object_info: Mapping) -> set[str]:
    """Types the workflow uses that are neither UI-only nor listed by the server."""
    return {t for t in node_types(workflow) if t not in VIRTUAL_TYPES and t not in object_info}


def to_api(workflow: Mapping, object_info: Mapping, *, extra_widget_types: Iterable[str] = (),
           meta: bool = True) -> dict[str, dict]:
    """Convert a UI-format workflow to API format with the server's /object_info (see the module doc)."""
    _check_supported(workflow)
    extra_widget_types = tuple(extra_widget_types)
    nodes = {n["id"]: n for n in workflow.get("nodes") or []}
    links = _links(workflow)
    missing = missing_node_types(workflow, object_info)
    if missing:
        raise UnknownNodeType(f"node types not known to the server: {', '.join(sorted(missing))}")

    def resolve(link_id: int | None, want_type: Any, seen: frozenset = frozenset()):
        """A link -> ("link", [origin id, slot]) | ("widget", None) (keep the widget value) | None (drop)."""
        if link_id is None or link_id not in links:
            return None
        if link_id in seen:
            raise UnsupportedWorkflow(f"link {link_id} is part of a cycle through UI-only or bypassed nodes")
        seen = seen | {link_id}
        origin_id, origin_slot = links[link_id][0], int(links[link_id][1])
        origin = nodes.get(origin_id)
        if origin is None:
            return None
        t, mode = str(origin["type"]), origin.get("mode", MODE_ALWAYS)
        if mode == MODE_BYPASS and t not in VIRTUAL_TYPES:
            ins = origin.get("inputs") or []
            outs = origin.get("outputs") or []
            out_type = outs[origin_slot].get("type") if origin_slot < len(outs) else want_type
            idx = -1
            if want_type in ("*", "", None):
                idx = origin_slot if len(ins) > origin_slot else (0 if ins else -1)
            elif origin_slot < len(ins) and _types_match(ins[origin_slot].get("type"), out_type) \
                    and _types_match(ins[origin_slot].get("type"), want_type):
                idx = origin_slot
            else:
                idx = next((i for i, s in enumerate(ins) if s.get("type") == want_type), -1)
                if idx == -1:
                    idx = next((i for i, s in enumerate(ins) if _types_match(s.get("type"), out_type)
                                and _types_match(s.get("type"), want_type)), -1)
            if idx == -1:
                return None
            return resolve(ins[idx].get("link"), want_type, seen)
        if t in VIRTUAL_TYPES:
            ins = origin.get("inputs") or []
            if t in REROUTE_TYPES and ins:
                return resolve(ins[0].get("link"), want_type, seen)
            if origin_slot < len(ins) and ins[origin_slot].get("link") is not None:
                return resolve(ins[origin_slot].get("link"), want_type, seen)
            return ("widget", None)  # a PrimitiveNode: its value was written into the target widget
        return ("link", [str(origin_id), origin_slot])

    api: dict[str, dict] = {}
    for node in sorted(nodes.values(), key=lambda n: (n.get("order", 0), str(n["id"]))):
        t = str(node["type"])
        if t in VIRTUAL_TYPES or node.get("mode", MODE_ALWAYS) in (MODE_NEVER, MODE_BYPASS):
            continue
        info = object_info[t]
        inputs: dict[str, Any] = {}
        for name, value in widget_values(node, info, extra_widget_types).items():
            inputs[name] = {"__value__": value} if isinstance(value, list) else value
        for slot in node.get("inputs") or []:
            if slot.get("link") is None:
                continue
            res = resolve(slot["link"], slot.get("type"))
            if res is None:  # nothing behind the link (frontend: the input is not sent)
                if slot.get("widget") is None:
                    inputs.pop(slot["name"], None)
                continue
            if res[0] == "link":
                inputs[slot["name"]] = res[1]
        entry = {"class_type": t, "inputs": inputs}
        if meta:
            entry["_meta"] = {"title": node.get("title") or info.get("display_name") or t}
        api[str(node["id"])] = entry
    # inputs linked to nodes that are not sent (muted) are dropped, as the frontend does
    for entry in api.values():
        for name, value in list(entry["inputs"].items()):
            if isinstance(value, list) and len(value) == 2 and value[0] not in api:
                del entry["inputs"][name]
    return api


# -- editing API prompts ------------------------------------------------------------------------------

def nodes_of(api: Mapping[str, dict], class_type: str) -> list[tuple[str, dict]]:
    return [(nid, n) for nid, n in api.items() if n["class_type"] == class_type]


def substitute(api: dict[str, dict], class_type: str, replacement: Mapping[str, Any],
               slot_map: Mapping[int, int] | None = None) -> list[str]:
    """Replace every ``class_type`` node by ``replacement`` ({"class_type", "inputs"}) in place, keeping its id.

    Links to the replaced node keep their output slot, or are renumbered by ``slot_map`` {old: new}
    (e.g. CheckpointLoaderSimple -> TexForceTestTinyCheckpoint needs none: MODEL/CLIP/VAE are 0/1/2 in both).
    Returns the replaced ids; a ``class_type`` that is not in the prompt is an error.
    """
    ids = [nid for nid, _ in nodes_of(api, class_type)]
    if not ids:
        raise KeyError(f"no {class_type} node in the prompt (has: {sorted({n['class_type'] for n in api.values()})})")
    for nid in ids:
        new = {"class_type": replacement["class_type"], "inputs": copy.deepcopy(dict(replacement.get("inputs") or {}))}
        if "_meta" in api[nid]:
            new["_meta"] = dict(api[nid]["_meta"])
        api[nid] = new
    if slot_map:
        for entry in api.values():
            for name, value in entry["inputs"].items():
                if isinstance(value, list) and len(value) == 2 and value[0] in ids:
                    entry["inputs"][name] = [value[0], int(slot_map.get(value[1], value[1]))]
    return ids


def set_inputs(api: dict[str, dict], class_type: str, **values: Any) -> list[str]:
    """Set widget inputs on every node of ``class_type``; returns their ids (error if there is none)."""
    ids = [nid for nid, _ in nodes_of(api, class_type)]
    if not ids:
        raise KeyError(f"no {class_type} node in the prompt")
    for nid in ids:
        api[nid]["inputs"].update(values)
    return ids


# -- checking UI workflows ----------------------------------------------------------------------------

def check_ui_workflow(workflow: Mapping, object_info: Mapping) -> list[str]:
    """Structural problems of a UI-format workflow against the server's node definitions ([] if none)."""
    problems: list[str] = []
    for key in ("last_node_id", "last_link_id", "nodes", "links", "groups", "config", "extra", "version"):
        if key not in workflow:
            problems.append(f"top-level key {key!r} missing")
    nodes = {n["id"]: n for n in workflow.get("nodes") or []}
    links = _links(workflow)
    if nodes and int(workflow.get("last_node_id", -1)) < max(int(i) for i in nodes):
        problems.append("last_node_id is smaller than a node id")
    if links and int(workflow.get("last_link_id", -1)) < max(links):
        problems.append("last_link_id is smaller than a link id")
    for lid, (o_id, o_slot, t_id, t_slot, ltype) in links.items():
        o, t = nodes.get(o_id), nodes.get(t_id)
        if o is None or t is None:
            problems.append(f"link {lid}: node {o_id if o is None else t_id} does not exist")
            continue
        outs, ins = o.get("outputs") or [], t.get("inputs") or []
        if o_slot >= len(outs) or lid not in (outs[o_slot].get("links") or []):
            problems.append(f"link {lid}: not listed on output {o_slot} of node {o_id}")
        if t_slot >= len(ins) or ins[t_slot].get("link") != lid:
            problems.append(f"link {lid}: not the link of input {t_slot} of node {t_id}")
        elif not (_types_match(ltype, ins[t_slot].get("type")) and o_slot < len(outs)
                  and _types_match(ltype, outs[o_slot].get("type"))):
            problems.append(f"link {lid}: type {ltype} does not fit its slots")
    for nid, node in nodes.items():
        t = str(node["type"])
        absent = [k for k in NODE_KEYS if k not in node]
        if absent:
            problems.append(f"node {nid}: keys {absent} missing (the frontend's schema requires them)")
        for slot in node.get("inputs") or []:
            if slot.get("link") is not None and slot["link"] not in links:
                problems.append(f"node {nid} input {slot.get('name')}: link {slot['link']} does not exist")
        for i, slot in enumerate(node.get("outputs") or []):
            for lid in slot.get("links") or []:
                if lid not in links or links[lid][0] != nid or links[lid][1] != i:
                    problems.append(f"node {nid} output {i}: link {lid} does not start here")
        if t in VIRTUAL_TYPES:
            continue
        info = object_info.get(t)
        if info is None:
            problems.append(f"node {nid}: type {t} is not known to the server")
            continue
        specs = {name: spec for name, spec, _ in ordered_inputs(info)}
        for slot in node.get("inputs") or []:
            spec = specs.get(slot.get("name"))
            if spec is None:
                problems.append(f"node {nid} ({t}): input {slot.get('name')!r} is not in the definition")
            elif not _types_match(slot.get("type"), input_type(spec)):
                problems.append(f"node {nid} ({t}): input {slot['name']} has type {slot.get('type')}, "
                                f"the definition says {input_type(spec)}")
        sockets = [name for name, spec, _ in ordered_inputs(info) if not is_widget(spec)]
        missing = [s for s in sockets if s not in {slot.get("name") for slot in node.get("inputs") or []}]
        if missing:
            problems.append(f"node {nid} ({t}): input sockets {missing} not listed")
        types = list(info.get("output") or [])
        names = list(info.get("output_name") or types)
        outs = node.get("outputs") or []
        if [o.get("type") for o in outs] != types:
            problems.append(f"node {nid} ({t}): output types {[o.get('type') for o in outs]} != {types}")
        elif [o.get("name") for o in outs] != names:
            problems.append(f"node {nid} ({t}): output names {[o.get('name') for o in outs]} != {names}")
        saved = node.get("widgets_values")
        layout = widget_layout(info)
        if isinstance(saved, list) and len(saved) != len(layout):
            problems.append(f"node {nid} ({t}): {len(saved)} widgets_values, the definition has {len(layout)} "
                            f"({[n or marker for n, marker in layout]})")
        elif isinstance(saved, list):
            for value, (name, spec) in zip(saved, layout):
                if name is None:
                    if spec == CONTROL and not is_control_value(value):
                        problems.append(f"node {nid} ({t}): control_after_generate = {value!r}: not one of "
                                        f"{', '.join(CONTROL_MODES)} (or a legacy true/false); the widget values "
                                        "are probably shifted")
                    continue
                problem = _value_problem(value, spec)
                if problem:
                    problems.append(f"node {nid} ({t}): widget {name} = {value!r}: {problem}")
    return problems


def _value_problem(value: Any, spec: Any) -> str | None:
    kind, opts = input_type(spec), input_options(spec)
    if kind == "INT" and (isinstance(value, bool) or not isinstance(value, int)):
        return "not an integer"
    if kind == "FLOAT" and (isinstance(value, bool) or not isinstance(value, (int, float))):
        return "not a number"
    if kind == "BOOLEAN" and not isinstance(value, bool):
        return "not a boolean"
    if kind == "STRING" and not isinstance(value, str):
        return "not a string"
    if kind in ("INT", "FLOAT"):
        if "min" in opts and value < opts["min"] or "max" in opts and value > opts["max"]:
            return f"outside [{opts.get('min')}, {opts.get('max')}]"
    return None
