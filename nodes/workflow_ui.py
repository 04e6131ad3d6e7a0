"""Bundled workflows come in twins: the API format /prompt takes (`*.api.json`, the source of truth)
and the UI format the graph editor opens (`*.json`). This module writes the UI twin from the API one
and reads back what both say (node types and widget values), so a test can check they agree.

Regenerate after editing an API workflow (object_info.json saved from a running server's /object_info):
    python -m tunegraph.nodes.workflow_ui object_info.json workflows/flux/*.api.json
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[1], int)


def _specs(info: dict[str, Any]) -> list[tuple[str, list]]:
    """(name, spec) of every input in the node's declared order (required first, then optional)."""
    order = info.get("input_order") or {g: list(info["input"].get(g, {})) for g in ("required", "optional")}
    out = []
    for group in ("required", "optional"):
        out.extend((name, info["input"][group][name]) for name in order.get(group, []))
    return out


def _is_widget(spec: list) -> bool:
    kind = spec[0]
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _default(spec: list) -> Any:
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    if isinstance(spec[0], list):
        return spec[0][0] if spec[0] else ""
    return options.get("options", [""])[0] if spec[0] == "COMBO" else None


def api_widget_values(node: dict[str, Any], info: dict[str, Any]) -> list[Any]:
    """The UI's widgets_values for an API node: widget inputs in order (a linked widget keeps its
    default), plus the 'fixed' seed control where the input has control_after_generate."""
    values = []
    for name, spec in _specs(info):
        if not _is_widget(spec):
            continue
        value = node["inputs"].get(name, _default(spec))
        values.append(_default(spec) if is_link(value) else value)
        if len(spec) > 1 and isinstance(spec[1], dict) and spec[1].get("control_after_generate"):
            values.append("fixed")
    return values


def _depths(api: dict[str, Any]) -> dict[str, int]:
    depth: dict[str, int] = {}

    def visit(nid: str) -> int:
        if nid not in depth:
            depth[nid] = 0
            ups = [v[0] for v in api[nid]["inputs"].values() if is_link(v)]
            depth[nid] = 1 + max((visit(u) for u in ups), default=-1)
        return depth[nid]

    for nid in api:
        visit(nid)
    return depth


def api_to_ui(api: dict[str, Any], object_info: dict[str, Any]) -> dict[str, Any]:
    """A LiteGraph workflow (the editor's format) with the same nodes, links and widget values."""
    depth, column = _depths(api), {}
    nodes = {nid: _ui_node(nid, api[nid], object_info[api[nid]["class_type"]]) for nid in api}
    links = []
    for nid, node in api.items():
        specs = dict(_specs(object_info[node["class_type"]]))
        for name, value in node["inputs"].items():
            if not is_link(value) or name not in specs:
                continue
            src, slot = str(value[0]), value[1]
            kind = object_info[api[src]["class_type"]]["output"][slot]
            link_id = len(links) + 1
            to_slot = _input_slot(nodes[nid], name, specs[name])
            nodes[nid]["inputs"][to_slot]["link"] = link_id
            links.append([link_id, int(src), slot, int(nid), to_slot, kind])
            nodes[src]["outputs"][slot]["links"].append(link_id)
    for nid in sorted(api, key=lambda n: (depth[n], int(n))):
        row = column.setdefault(depth[nid], 0)
        column[depth[nid]] += 1
        nodes[nid]["pos"] = [40 + 380 * depth[nid], 40 + 320 * row]
    return {
        "last_node_id": max(int(n) for n in api),
        "last_link_id": len(links),
        "nodes": [nodes[n] for n in sorted(api, key=int)],
        "links": links,
        "groups": [],
        "config": {},
        "extra": {},
        "version": 0.4,
    }


def _ui_node(nid: str, node: dict[str, Any], info: dict[str, Any]) -> dict[str, Any]:
    inputs = [{"name": n, "type": s[0], "link": None} for n, s in _specs(info) if not _is_widget(s)]
    outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
               for i, (name, kind) in enumerate(zip(info["output_name"], info["output"], strict=True))]  # fmt: skip
    return {
        "id": int(nid),
        "type": node["class_type"],
        "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
        "pos": [0, 0],
        "size": [340, 260],
        "flags": {},
        "order": int(nid),
        "mode": 0,
        "inputs": inputs,
        "outputs": outputs,
        "properties": {"Node name for S&R": node["class_type"]},
        "widgets_values": api_widget_values(node, info),
    }


def _input_slot(ui_node: dict[str, Any], name: str, spec: list) -> int:
    """Slot of input `name`; a linked widget gets an input entry that points at its widget."""
    for i, entry in enumerate(ui_node["inputs"]):
        if entry["name"] == name:
            return i
    kind = "COMBO" if isinstance(spec[0], list) else spec[0]
    ui_node["inputs"].append({"name": name, "type": kind, "link": None, "widget": {"name": name}})
    return len(ui_node["inputs"]) - 1


def ui_summary(ui: dict[str, Any]) -> dict[str, tuple[str, list]]:
    """{node id: (type, widgets_values)} of a UI workflow."""
    return {str(n["id"]): (n["type"], list(n.get("widgets_values") or [])) for n in ui["nodes"]}


def api_summary(api: dict[str, Any], object_info: dict[str, Any]) -> dict[str, tuple[str, list]]:
    return {
        nid: (n["class_type"], api_widget_values(n, object_info[n["class_type"]])) for nid, n in api.items()
    }


def template_path(ui_path: Path) -> Path:
    """Where ComfyUI's template browser finds a UI workflow: it lists only `<pack>/example_workflows/
    *.json` (one level), so each `workflows/<family>/<name>.json` has a copy `<family>-<name>.json`."""
    return ui_path.parents[2] / "example_workflows" / f"{ui_path.parent.name}-{ui_path.name}"


def main(argv: list[str]) -> None:
    object_info = json.loads(Path(argv[0]).read_text())
    for name in argv[1:]:
        api_path = Path(name).resolve()
        ui_path = api_path.with_name(api_path.name.replace(".api.json", ".json"))
        text = json.dumps(api_to_ui(json.loads(api_path.read_text()), object_info), indent=1) + "\n"
        ui_path.write_text(text)
        template_path(ui_path).parent.mkdir(exist_ok=True)
        template_path(ui_path).write_text(text)
        print(f"wrote {ui_path} and {template_path(ui_path)}")


if __name__ == "__main__":
    main(sys.argv[1:])
