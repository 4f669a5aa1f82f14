"""The application's modules import each other without a loop, and the
dimse crate names nothing of the application (issue 11's boundaries).

A loop means two modules can only be understood together; the protocol
crate naming the application would put policy back into it. This reads
the sources: every `crate::MODULE` outside comments, strings and test
modules is an edge from the top-level module it is written in.
"""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def edges(src_dir):
    graph = {}
    for path in src_dir.rglob("*.rs"):
        top = path.relative_to(src_dir).parts[0].removesuffix(".rs")
        if top in ("main", "lib"):
            continue
        text = path.read_text()
        cut = text.find("#[cfg(test)]")
        if cut >= 0:
            text = text[:cut]
        deps = graph.setdefault(top, set())
        for line in text.splitlines():
            line = line.strip()
            if line.startswith("//"):
                continue
            line = re.sub(r'"[^"]*"', "", line)
            deps.update(d for d in re.findall(r"crate::([a-z_0-9]+)", line) if d != top)
    return graph


def loops(graph):
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, found = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.get(v, ()):
            if w not in graph:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_finder_finds_a_loop():
    assert loops({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_two_application_modules_import_each_other_in_a_loop():
    graph = edges(ROOT / "app" / "src")
    assert len(graph) > 10, graph
    assert loops(graph) == []


def test_the_dimse_crate_names_nothing_of_the_application():
    manifest = (ROOT / "app" / "dimse" / "Cargo.toml").read_text()
    for crate in ("minipacs", "clap", "serde", "toml", "rusqlite"):
        assert not re.search(rf"^{crate}\s*=", manifest, re.M), crate
    for path in (ROOT / "app" / "dimse" / "src").rglob("*.rs"):
        assert "minipacs::" not in path.read_text(), path
