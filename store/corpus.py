"""The built-in corpus: fixed English text shipped with the package, for offline runs.

`builtin_corpus()` reads `builtin_corpus.jsonl.gz` beside this file: 4780 docstrings
(1.1 MB of mostly English text) of the standard-library modules in `BUILTIN_MODULES`,
extracted from CPython 3.11.7 (PSF License) by `stdlib_corpus` and stored with
`write_corpus`. Shipping the text instead of reading the local standard library keeps
the corpus, and every figure measured on it, identical on every machine and Python
version. To rebuild it (the text then follows the local Python):

    python -c "from store import corpus; corpus.write_corpus(corpus.stdlib_corpus(), corpus.BUILTIN_CORPUS)"
"""

from __future__ import annotations

import ast
import functools
import gzip
import json
import sysconfig
from pathlib import Path

BUILTIN_CORPUS = Path(__file__).with_name("builtin_corpus.jsonl.gz")

# Pure-Python standard library modules (paths under the stdlib directory, without
# ".py"), chosen for long English docstrings. Parsed with `ast`, never imported, so
# modules needing optional parts (turtle needs Tk) still contribute text.
BUILTIN_MODULES = (
    "_pydecimal _pyio _collections_abc abc argparse ast "
    "asyncio/base_events asyncio/events asyncio/locks asyncio/queues asyncio/streams "
    "asyncio/tasks asyncio/transports asyncio/unix_events base64 bdb bisect calendar cmd "
    "code codecs codeop collections/__init__ colorsys compileall concurrent/futures/_base "
    "configparser contextlib copy csv dataclasses datetime difflib dis doctest "
    "email/_header_value_parser email/feedparser email/headerregistry email/message "
    "email/utils enum filecmp fileinput fnmatch fractions ftplib functools getopt gettext "
    "glob gzip hashlib heapq hmac html/parser http/client http/cookiejar http/cookies "
    "http/server imaplib importlib/metadata/__init__ inspect ipaddress json/__init__ "
    "json/decoder json/encoder linecache locale logging/__init__ logging/config "
    "logging/handlers lzma mailbox mimetypes multiprocessing/connection "
    "multiprocessing/managers multiprocessing/pool multiprocessing/process netrc ntpath "
    "numbers opcode optparse os pathlib pdb pickle pickletools pkgutil platform plistlib "
    "poplib posixpath pprint profile pstats pydoc queue quopri random reprlib runpy sched "
    "secrets selectors shelve shlex shutil smtplib socket socketserver sqlite3/__init__ "
    "statistics string struct subprocess symtable sysconfig tarfile tempfile textwrap "
    "threading timeit tokenize trace traceback tracemalloc turtle types typing unittest/case "
    "unittest/loader unittest/mock urllib/parse urllib/request uuid warnings wave weakref "
    "webbrowser xml/dom/minidom xml/etree/ElementTree xml/sax/handler zipfile zipimport "
    "zoneinfo/_zoneinfo"
).split()


def _docstrings(source: str) -> list[str]:
    """Cleaned docstrings of a module, its classes and functions, in source order."""
    found = []

    def visit(node):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                found.append(doc)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(source))
    return found


def stdlib_corpus() -> list[str]:
    """Docstrings of `BUILTIN_MODULES` in the local Python's standard library, in order.

    What the shipped corpus was made from (see `BUILTIN_CORPUS`); the text differs
    between Python versions, so training reads the shipped file instead.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in BUILTIN_MODULES:
        path = root / f"{name}.py"
        if path.is_file():  # a trimmed install may lack a module: use the others
            docs.extend(_docstrings(path.read_text(encoding="utf-8")))
    return docs


def write_corpus(docs: list[str], path: str | Path) -> None:
    """Writes `docs` as gzipped JSONL ({"text": doc} per line), byte-identical for equal docs."""
    lines = "".join(json.dumps({"text": doc}, ensure_ascii=False) + "\n" for doc in docs)
    Path(path).write_bytes(gzip.compress(lines.encode("utf-8"), compresslevel=9, mtime=0))


@functools.lru_cache(maxsize=1)
def _builtin_corpus() -> tuple[str, ...]:
    with gzip.open(BUILTIN_CORPUS, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line)["text"] for line in f)


def builtin_corpus() -> list[str]:
    """The built-in corpus (`BUILTIN_CORPUS`), one document per docstring.

    Identical on every machine: 4780 documents, 1,087,272 characters. Nothing is
    written to disk.

    Raises:
      FileNotFoundError: the package was installed without its data file.
    """
    if not BUILTIN_CORPUS.is_file():
        raise FileNotFoundError(f"the built-in corpus {BUILTIN_CORPUS} is missing: reinstall mpx "
                                "(pip install -e .) or set data.source to your own .txt/.jsonl files")
    return list(_builtin_corpus())
