"""What the folders share lives in one module inside each folder, byte-identical in every copy;
and no folder imports from another, so that each still runs when it is copied out alone."""

import ast
import difflib

import pytest

from conftest import ROOT

ALL_FOLDERS = ["basic", "openai-sse", "openai-advanced"]
SHARED = {"contract.py": ALL_FOLDERS, "provider_stream.py": ["openai-sse", "openai-advanced"],
          "gunicorn.conf.py": ["openai-sse", "openai-advanced"]}  # basic's runs threads instead


def python_files(folder):
    """The folder's own .py files (not a virtualenv or bytecode a user may have made there)."""
    return sorted(path for path in (ROOT / folder).rglob("*.py")
                  if not {".venv", "__pycache__"} & set(path.relative_to(ROOT / folder).parts))


def module_names(folder):
    """What `import x` finds in the folder: its top-level .py files and packages."""
    return {path.stem for path in (ROOT / folder).glob("*.py")} | \
        {path.parent.name for path in (ROOT / folder).glob("*/__init__.py")}


@pytest.mark.parametrize("module", list(SHARED))
def test_shared_module_is_identical_in_every_folder(module):
    folders = SHARED[module]
    missing = [f"{folder}/{module}" for folder in folders if not (ROOT / folder / module).exists()]
    assert not missing, f"missing: {', '.join(missing)}"
    first = ROOT / folders[0] / module
    for folder in folders[1:]:
        other = ROOT / folder / module
        if other.read_bytes() != first.read_bytes():
            diff = difflib.unified_diff(
                first.read_text().splitlines(), other.read_text().splitlines(),
                f"{folders[0]}/{module}", f"{folder}/{module}", lineterm="", n=1)
            pytest.fail(f"{folders[0]}/{module} and {folder}/{module} differ; they must be "
                        "byte-identical copies:\n" + "\n".join(list(diff)[:60]), pytrace=False)


@pytest.mark.parametrize("module", list(SHARED))
def test_shared_module_says_so_on_its_first_line(module):
    for folder in SHARED[module]:
        path = ROOT / folder / module
        assert path.exists(), f"missing: {folder}/{module}"
        lines = path.read_text().splitlines()
        first_line = lines[0] if lines else ""
        assert "identical" in first_line, \
            f"{folder}/{module}: the first line must say the file is shared and identical in " \
            f"{', '.join(SHARED[module])}; it is {first_line!r}"


@pytest.mark.parametrize("folder", ALL_FOLDERS)
def test_no_folder_imports_from_another(folder):
    own = module_names(folder)
    others = set()
    for other in ALL_FOLDERS:
        if other != folder:
            others |= module_names(other) | {other, other.replace("-", "_")}
    foreign = others - own
    problems = []
    for path in python_files(folder):
        name = path.relative_to(ROOT)
        tree = ast.parse(path.read_text(), str(name))
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr == "path" and \
                    isinstance(node.value, ast.Name) and node.value.id == "sys":
                problems.append(f"{name}:{node.lineno}: uses sys.path")
            elif isinstance(node, ast.Attribute) and node.attr == "addsitedir":
                problems.append(f"{name}:{node.lineno}: uses site.addsitedir")
            elif isinstance(node, ast.ImportFrom) and node.level:
                problems.append(f"{name}:{node.lineno}: relative import "
                                f"`from {'.' * node.level}{node.module or ''} import ...`")
            elif isinstance(node, ast.ImportFrom) and node.module.split(".")[0] in foreign:
                problems.append(f"{name}:{node.lineno}: imports {node.module}, "
                                f"which only another folder has")
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split(".")[0] in foreign:
                        problems.append(f"{name}:{node.lineno}: imports {alias.name}, "
                                        f"which only another folder has")
    assert not problems, f"{folder} must run alone when copied out:\n" + "\n".join(problems)
