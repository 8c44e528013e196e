"""The package's imports run one way: along the data flow, no cycles (docs/architecture.md).

Every import counts, function-local ones included. A module may import its own folder and the layers below
its own; folders on one layer (the three stages) do not import each other."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "aftray"
# lowest first; a name is a folder or a module directly under aftray/
LAYERS = [
    ("loss_table",),  # each loss once, torch-free: config validates `loss.name` against it
    ("config", "logs"),  # logs: where each process's log lines go (stdlib only)
    ("rows", "weights"),  # the group-row contract and the state-dict payload: shared by the three stages
    ("models",),
    ("tasks",),
    ("cluster",),
    ("rollout", "verify", "train"),
    ("run",),
    ("loop",),
    ("experiments", "commands"),
    ("cli",),
]
LEVEL = {name: i for i, names in enumerate(LAYERS) for name in names}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the aftray modules it imports (`from aftray.x import y` names module y when it is one)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                edges |= {a.name for a in node.names if a.name.startswith("aftray.")}
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("aftray"):
                assert node.level == 0, f"{name}: relative import"
                edges |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                          for a in node.names}
        graph[name] = edges - {name}
    return graph


def folder(module: str) -> str:
    return module.split(".")[1] if "." in module else ""


def test_every_folder_has_a_layer():
    names = {folder(m) for m in import_graph()} - {""}
    assert names <= set(LEVEL), f"place these in LAYERS: {sorted(names - set(LEVEL))}"


def test_imports_only_go_down():
    bad = [f"{src} -> {dst} ({folder(src)} may import only: {', '.join(n for n in LEVEL if LEVEL[n] < LEVEL[folder(src)])})"
           for src, dsts in sorted(import_graph().items()) if folder(src)
           for dst in sorted(dsts) if folder(dst) != folder(src) and LEVEL[folder(dst)] >= LEVEL[folder(src)]]
    assert not bad, "imports against the layer order:\n" + "\n".join(bad)


def test_no_import_cycles():
    graph, cycles, state = import_graph(), [], {}

    def visit(module: str, path: list[str]) -> None:
        state[module] = "open"
        for dst in sorted(graph.get(module, ())):
            if state.get(dst) == "open":
                cycles.append(" -> ".join(path[path.index(dst):] + [module, dst]))
            elif dst not in state:
                visit(dst, path + [module])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)
