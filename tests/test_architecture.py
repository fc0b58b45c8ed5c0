"""The shape of job/ that README "Architecture" describes, checked from the source (no imports run):

- no import circle between job's modules, counting imports inside functions too;
- only the CLI and the runner reach down into job.stages; nothing below imports upward;
- the pipeline never talks to other ranks itself (job/distributed.py's RankProtocol does);
- every run path is spelled once, in job/layout.py.
"""

import ast
from pathlib import Path

from tests.helpers import ROOT

JOB = ROOT / "job"
# Modules above the stages: they assemble the pipeline from them.
ABOVE_STAGES = {"job.cli", "job.runner", "job.__main__"}


def module_name(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def imports_of(path: Path) -> set[str]:
    """The job modules `path` imports, anywhere in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "job":
            found.add(node.module)
            for alias in node.names:  # `from job import distributed`, `from job.stages import format`
                candidate = f"{node.module}.{alias.name}"
                if (ROOT / Path(*candidate.split("."))).with_suffix(".py").is_file():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "job")
    return found - {"job", module_name(path)}  # `import job` reads __version__ only


GRAPH = {module_name(path): imports_of(path) for path in sorted(JOB.rglob("*.py"))}


def test_no_import_circle():
    circles, state = [], {}

    def visit(module, trail):
        state[module] = "open"
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == "open":
                circles.append(" -> ".join(trail[trail.index(target):] + [target]))
            elif target in GRAPH and target not in state:
                visit(target, trail + [target])
        state[module] = "done"

    for module in GRAPH:
        if module not in state:
            visit(module, [module])
    assert circles == []


def test_nothing_below_the_stages_imports_them():
    upward = {module: sorted(t for t in targets if t == "job.stages" or t.startswith("job.stages."))
              for module, targets in GRAPH.items()
              if module not in ABOVE_STAGES and not module.startswith("job.stages")}
    assert {m: t for m, t in upward.items() if t} == {}


def test_the_pipeline_leaves_rank_messages_to_the_rank_protocol():
    source = (JOB / "pipeline.py").read_text(encoding="utf-8")
    assert "broadcast" not in source and "job.distributed import" in source
    assert "RankProtocol" in source


STORE_CALLS = {"read_text", "write_text", "read_bytes", "write_bytes", "exists", "delete", "list", "uri_of",
               "download_dir", "upload_dir", "download_file", "upload_file"}


def spelled_paths(path: Path, paths: set[str]) -> list[str]:
    """Where `path` spells a run path itself: any string constant holding one of the distinctive paths
    (data/train.jsonl, _stages, config.yaml, ...), or a one-word path (merged, adapter) given to a store call or to
    a stage's `outputs=`. Docstrings and messages that only mention a folder are not paths."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in paths \
                and ("/" in node.value or node.value.startswith("_") or "." in node.value):
            found.append((node.lineno, node.value))  # data/eval.jsonl, _stages, config.yaml, _lease.json
        if isinstance(node, ast.Call):
            spots = list(node.args) if isinstance(node.func, ast.Attribute) and node.func.attr in STORE_CALLS else []
            spots += [k.value for k in node.keywords if k.arg == "outputs"]
            for spot in spots:
                for const in ast.walk(spot):
                    if isinstance(const, ast.Constant) and isinstance(const.value, str) \
                            and const.value.split("/")[0] in paths:
                        found.append((const.lineno, const.value))
    return [f"{path.relative_to(ROOT)}:{line}: {value!r}" for line, value in sorted(set(found))]


def test_run_paths_are_named_once_in_layout():
    import job.layout as layout

    paths = {value for name, value in vars(layout).items() if name.isupper() and isinstance(value, str)}
    assert {"config.yaml", "_stages", "data/train.jsonl", "checkpoints/LATEST", "merged", "report"} <= paths
    elsewhere = [spot for path in sorted(JOB.rglob("*.py")) if path.name != "layout.py"
                 for spot in spelled_paths(path, paths)]
    assert elsewhere == []


def test_the_cli_knows_the_stages_the_pipeline_runs():
    """cli.STAGES stays a literal (`job config` and `job plan` must not import the stages' dependencies)."""
    from job.cli import STAGES
    from job.stages import all_stages

    assert STAGES == tuple(stage.name for stage in all_stages())
