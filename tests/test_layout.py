"""Size rules of the product package, read from the source: files under 400 lines, functions under 80 (the
developers' guide: one job per short file; a long function is several jobs)."""
import ast

from tests.importgraph import ROOT

MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80


def _sources():
    return sorted((ROOT / "disagg").rglob("*.py"))


def test_no_file_of_the_product_reaches_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in _sources() if (n := len(p.read_text().splitlines())) >= MAX_FILE_LINES}
    assert not long, long


def test_no_function_of_the_product_is_over_80_lines():
    long = {}
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    long[f"{path.relative_to(ROOT)}:{node.name}"] = length
    assert not long, long


def test_the_size_check_sees_a_long_function(tmp_path):
    # the detector itself: a 100-line function is found
    body = "\n".join(f"    x{i} = {i}" for i in range(100))
    node = ast.parse(f"def f():\n{body}\n").body[0]
    assert node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
