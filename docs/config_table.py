"""Print the README's config reference table from job/config.py (keys, defaults, docstrings).

    python docs/config_table.py
tests/test_readme.py checks that the README lists every key, so regenerate after adding one.
"""

import ast
import dataclasses
import inspect

import job.config as C


def field_docs() -> dict:
    docs = {}
    for node in ast.parse(inspect.getsource(C)).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for i, stmt in enumerate(node.body):
            if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
                continue
            doc = ""
            following = node.body[i + 1] if i + 1 < len(node.body) else None
            if isinstance(following, ast.Expr) and isinstance(getattr(following, "value", None), ast.Constant):
                doc = str(following.value.value)
            if isinstance(stmt.value, ast.Call) and getattr(stmt.value.func, "id", "") == "secret":
                doc = stmt.value.args[1].value + " Secret: redacted everywhere."
            docs[(node.name, stmt.target.id)] = " ".join(doc.split())
    return docs


def main():
    docs, cfg = field_docs(), C.Config()
    print("| key | default | meaning |\n| --- | --- | --- |")
    print(f"| `run_uri` | (required) | {docs[('Config', 'run_uri')]} |")
    for section in dataclasses.fields(cfg):
        values = getattr(cfg, section.name)
        if not dataclasses.is_dataclass(values):
            continue
        for f in dataclasses.fields(values):
            value = getattr(values, f.name)
            if f"{section.name}.{f.name}" in C.REQUIRED:
                shown = "(required)"
            else:
                shown = "`" + repr(value).replace("'", '"') + "`"
                shown = shown if len(shown) <= 40 else "(long text, see `job config`)"
            print(f"| `{section.name}.{f.name}` | {shown} | {docs.get((type(values).__name__, f.name), '')} |")


if __name__ == "__main__":
    main()
