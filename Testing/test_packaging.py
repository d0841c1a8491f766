"""Packaging for the Slicer Extensions Index: the catalog entry DRSegUNet.json, the older description file
DRSegUNet.s4ext, the extension block of CMakeLists.txt, LICENSE, the screenshot, and the one placeholder for
the repository URL and contributors (publication.json) that all of them repeat; and that the documentation's
links and the repository paths it names lead somewhere.

No network and no third-party package: the schema's rules and the Index's checks are copied below, each with
the place it was copied from."""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parents[1]
CATALOG_ENTRY = REPO / "DRSegUNet.json"
S4EXT = REPO / "DRSegUNet.s4ext"
CMAKELISTS = REPO / "CMakeLists.txt"
PUBLICATION = REPO / "publication.json"

# --- Copied from the schema -------------------------------------------------------------------------------
# github.com/Slicer/Slicer, branch main (commit 583e9b37d50ead7daf7b783dce465ccaecec8809),
# Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json (the same file is in github.com/Slicer/ExtensionsIndex,
# schemas/). Draft-07, "additionalProperties": false; no property for a licence, homepage, contributors,
# icon or screenshots (those stay in CMakeLists.txt and the .s4ext).
SCHEMA_URL = "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.1.json"
SCHEMA_REQUIRED = ("$schema", "category", "scm_url")
SCHEMA_PROPERTIES = {  # name -> JSON type
    "$schema": str,
    "category": str,
    "scm_url": str,
    "scm_revision": str,
    "scm_type": str,
    "build_dependencies": list,  # items: string
    "build_subdirectory": str,  # default "."
    "enabled": bool,  # default true
    "tier": int,  # default 1, minimum 1, maximum 5
}
SCHEMA_SCM_TYPES = ("git", "local")  # "enum", default "git"
SCHEMA_TIER_RANGE = (1, 5)

# --- Copied from the Index's checks -----------------------------------------------------------------------
# github.com/Slicer/ExtensionsIndex, branch main (commit 07f1d1b2781c7dd9f6e2a9f5521b3ed43631724c),
# scripts/check_description_files.py: ACCEPTED_EXTENSION_CATEGORIES, the scm_url schemes of
# check_scm_url_syntax, the licence file names of check_license_file, and the regular expressions with which
# check_cmakelists_content reads the top-level CMakeLists.txt as text.
INDEX_CATEGORIES = (
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda",
    "Converters", "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation",
    "Filtering", "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT",
    "Informatics", "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning",
    "Otolaryngology", "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy",
    "Registration", "Remote", "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis",
    "Shape Regression", "Shape Visualization", "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging",
    "Supervisely", "Surface Models", "SurfaceLearner", "Tomographic Reconstruction", "Tracking", "Tractography",
    "Training", "Ultrasound", "Utilities", "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools",
    "Web System Tools", "Wizards",
)
INDEX_SCM_SCHEMES = ("git", "https")
INDEX_LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
INDEX_PROJECT_RE = r'project\s*\(\s*([^\s\)\n\r]+)'
INDEX_ICONURL_RE = r'set\s*\(EXTENSION_ICONURL\s*"([^"]+)"[ ]*\)'
INDEX_SCREENSHOTURLS_RE = r'set\s*\(EXTENSION_SCREENSHOTURLS\s*"([^"]+)"\)'

# sha1 of the Apache License 2.0 as published at https://www.apache.org/licenses/LICENSE-2.0.txt (11358 bytes).
APACHE_2_0_SHA1 = "2b8b815229aa8a61e483fb4ba0588b8b6c491890"

# Every file that repeats the placeholder repository URL or contributors of publication.json. Publishing is one
# search-and-replace over exactly these files; a new copy elsewhere fails test_placeholder_files until listed here.
PLACEHOLDER_FILES = (
    "CMakeLists.txt",
    "DRSegUNet.json",
    "DRSegUNet.s4ext",
    "DRSegUNet/DRSegUNet.py",  # contributors only (self.parent.contributors)
    "publication.json",
)
_SKIP_DIRS = {".git", ".venv", "venv", ".pytest_cache", "__pycache__", "runs", "out", "build", ".mypy_cache"}


def _catalog() -> dict:
    return json.loads(CATALOG_ENTRY.read_text(encoding="utf-8"))


def _publication() -> dict:
    return json.loads(PUBLICATION.read_text(encoding="utf-8"))


def _s4ext() -> dict[str, str]:
    """keyword -> value: the first token of each non-comment line is the keyword, the rest is the value."""
    fields = {}
    for line in S4EXT.read_text(encoding="utf-8").splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.strip().partition(" ")
            fields[key] = value.strip()
    return fields


def _cmake_set(name: str) -> str:
    found = re.findall(rf'^\s*set\(\s*{name}\s+(?:"([^"]*)"|([^\s")]+))\s*\)', CMAKELISTS.read_text(encoding="utf-8"), re.M)
    assert len(found) == 1, f"{name} should be set exactly once in CMakeLists.txt, found {found}"
    quoted, bare = found[0]
    return (quoted or bare).strip()


def _repo_url(url: str) -> str:
    return url.strip().rstrip("/").removesuffix(".git")


def _owner_repo(url: str) -> tuple[str, str]:
    parts = urlsplit(_repo_url(url)).path.strip("/").split("/")
    assert len(parts) == 2, f"not a repository URL: {url}"
    return parts[0], parts[1]


def _raw_url_prefix() -> str:
    owner, repo = _owner_repo(_publication()["repository_url"])
    return f"https://raw.githubusercontent.com/{owner}/{repo}/{_publication()['branch']}/"


def test_catalog_entry_follows_schema_v1_0_1() -> None:
    raw = CATALOG_ENTRY.read_bytes()
    assert b"\r" not in raw, "the Index wants LF line endings only (check_json_file_format)"
    entry = _catalog()
    missing = [k for k in SCHEMA_REQUIRED if not entry.get(k)]
    assert not missing, f"required by the schema and missing or empty: {missing}"
    extra = sorted(set(entry) - set(SCHEMA_PROPERTIES))
    assert not extra, f"the schema allows no other properties (additionalProperties: false): {extra}"
    for key, value in entry.items():
        expected = SCHEMA_PROPERTIES[key]
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        assert ok, f"{key} must be a JSON {expected.__name__}, got {value!r}"
    assert entry["$schema"].split("#")[0] == SCHEMA_URL
    assert all(isinstance(d, str) and d for d in entry.get("build_dependencies", []))
    assert entry.get("scm_type", "git") in SCHEMA_SCM_TYPES
    assert SCHEMA_TIER_RANGE[0] <= entry.get("tier", 1) <= SCHEMA_TIER_RANGE[1]
    # the Index's own checks on the entry
    assert entry["category"] in INDEX_CATEGORIES
    assert "://" in entry["scm_url"] and urlsplit(entry["scm_url"]).scheme in INDEX_SCM_SCHEMES
    # what this extension needs: PyTorch built first, the repository's top folder, enabled once installed
    assert entry["build_dependencies"] == ["PyTorch"]
    assert entry["build_subdirectory"] == "."
    assert entry["enabled"] is True


def test_catalog_entry_agrees_with_s4ext_and_cmakelists() -> None:
    entry, s4ext, pub = _catalog(), _s4ext(), _publication()
    # the extension's name: the JSON file's name, the .s4ext's name and project() in CMakeLists.txt
    project = re.findall(INDEX_PROJECT_RE, CMAKELISTS.read_text(encoding="utf-8"), re.I | re.M)
    assert project and project[0].strip("\"'") == CATALOG_ENTRY.stem == S4EXT.stem == "DRSegUNet"
    # repository and revision
    assert s4ext["scm"] == entry.get("scm_type", "git") == "git"
    assert _repo_url(entry["scm_url"]) == _repo_url(s4ext["scmurl"]) == _repo_url(pub["repository_url"])
    assert entry["scm_revision"] == s4ext["scmrevision"] == pub["branch"]
    assert entry["build_subdirectory"] == s4ext["build_subdirectory"]
    assert entry["enabled"] == (s4ext["enabled"] == "1")
    # category and dependencies
    assert entry["category"] == s4ext["category"] == _cmake_set("EXTENSION_CATEGORY") == "Segmentation"
    assert entry["build_dependencies"] == s4ext["depends"].split() == _cmake_set("EXTENSION_DEPENDS").split()
    # what only the .s4ext and CMakeLists.txt carry
    assert s4ext["homepage"] == _cmake_set("EXTENSION_HOMEPAGE") == _repo_url(pub["repository_url"])
    assert s4ext["contributors"] == _cmake_set("EXTENSION_CONTRIBUTORS") == pub["contributors"]
    assert s4ext["iconurl"] == _cmake_set("EXTENSION_ICONURL")
    assert s4ext["status"] == _cmake_set("EXTENSION_STATUS")
    screenshots = s4ext["screenshoturls"].split()
    assert screenshots, "screenshoturls must not be empty"
    assert screenshots == _cmake_set("EXTENSION_SCREENSHOTURLS").split()


def test_cmakelists_lines_the_index_reads_as_text() -> None:
    text = CMAKELISTS.read_text(encoding="utf-8")
    icon = re.findall(INDEX_ICONURL_RE, text, re.I | re.M)
    shots = re.findall(INDEX_SCREENSHOTURLS_RE, text, re.I | re.M)
    assert len(icon) == 1 and len(shots) == 1, "the Index finds EXTENSION_ICONURL / EXTENSION_SCREENSHOTURLS"
    for url in [icon[0]] + shots[0].split():
        assert url.startswith("http") and url.lower().endswith((".png", ".jpg", ".jpeg", ".gif")), url


def test_icon_and_screenshot_urls_point_at_files_of_this_repository() -> None:
    prefix = _raw_url_prefix()
    urls = [_s4ext()["iconurl"]] + _s4ext()["screenshoturls"].split()
    for url in urls:
        assert url.startswith(prefix), f"{url} should be a raw URL under {prefix}"
        path = REPO / url[len(prefix):]
        assert path.is_file(), f"{url} names {path.relative_to(REPO)}, which is not in the repository"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", f"{path.name} is not a PNG"
    screenshot = REPO / "docs" / "screenshot.png"
    assert prefix + "docs/screenshot.png" in urls
    assert screenshot.stat().st_size < 400_000, "keep the screenshot under 400 kB"
    assert (REPO / "docs" / "render_screenshot.py").is_file(), "the screenshot is made by docs/render_screenshot.py"
    slicer_md = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    assert "screenshot.png" in slicer_md and "not a screenshot of the Slicer GUI" in slicer_md


def test_license_is_apache_2_0_and_referenced() -> None:
    license_file = REPO / "LICENSE"
    assert license_file.name in INDEX_LICENSE_FILE_NAMES
    text = license_file.read_bytes()
    assert text.lstrip().startswith(b"Apache License") and b"Version 2.0, January 2004" in text
    assert hashlib.sha1(text).hexdigest() == APACHE_2_0_SHA1, "LICENSE must be the unmodified Apache License 2.0"
    assert _cmake_set("EXTENSION_LICENSE_FILE") == "${CMAKE_CURRENT_SOURCE_DIR}/LICENSE"
    assert "Apache License 2.0" in CMAKELISTS.read_text(encoding="utf-8")
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert re.search(r"Apache License 2\.0.*\(`LICENSE`\)|\(`LICENSE`\).*Apache License 2\.0", readme), \
        "README.md should name the licence and the LICENSE file"
    assert "license" not in {k.lower() for k in _catalog()}, "schema v1.0.1 has no licence property"


def _files_containing(needles: list[bytes]) -> dict[str, list[bytes]]:
    found = {}
    for path in sorted(REPO.rglob("*")):
        rel = path.relative_to(REPO)
        if any(part in _SKIP_DIRS for part in rel.parts) or not path.is_file():
            continue
        if path.stat().st_size > 20_000_000:
            continue
        data = path.read_bytes()
        hits = [n for n in needles if n in data]
        if hits:
            found[rel.as_posix()] = hits
    return found


def test_placeholder_files() -> None:
    """Lists the files that repeat the placeholder repository URL and contributors, and checks they agree."""
    pub = _publication()
    url = _repo_url(pub["repository_url"])
    owner, repo = _owner_repo(url)
    raw = f"raw.githubusercontent.com/{owner}/{repo}/"
    needles = [url.encode(), raw.encode(), pub["contributors"].encode()]
    found = _files_containing(needles)
    status = pub["status"]
    print(f"\npublication.json status {status!r}: repository URL {url!r}, contributors {pub['contributors']!r} "
          f"appear in:\n  " + "\n  ".join(f"{f}  ({', '.join(h.decode() for h in hits)})" for f, hits in found.items()))
    assert sorted(found) == sorted(PLACEHOLDER_FILES), \
        f"files that repeat the placeholder changed: now {sorted(found)}; update PLACEHOLDER_FILES"
    assert status in ("PLACEHOLDER", "published")
    # A half-done replacement: any other github.com / raw.githubusercontent.com URL of this extension's repository
    # in these files (an old owner or name left behind) fails here.
    url_re = re.compile(r"https?://(?:raw\.githubusercontent\.com|github\.com)/([\w.-]+)/([\w.-]+)")
    for name in PLACEHOLDER_FILES:
        text = (REPO / name).read_text(encoding="utf-8")
        for match_owner, match_repo in url_re.findall(text):
            if match_owner == "Slicer":  # the schema's own URL
                continue
            assert (match_owner, match_repo.removesuffix(".git")) == (owner, repo), \
                f"{name}: github.com/{match_owner}/{match_repo} does not match publication.json ({owner}/{repo})"
    raws = re.findall(r"https://raw\.githubusercontent\.com/[^\s\"']+", CMAKELISTS.read_text(encoding="utf-8"))
    assert raws and all(u.startswith(_raw_url_prefix()) for u in raws), "raw URLs must use publication.json's branch"


def test_headless_docs_name_the_installed_script_and_no_splash() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    in_slicer = readme.split("## In 3D Slicer", 1)[1].split("\n## ", 1)[0]
    slicer_md = (REPO / "docs" / "slicer.md").read_text(encoding="utf-8")
    for text in (in_slicer, slicer_md):
        assert "--no-splash" in text
        assert "qt-scripted-modules/Scripts/segment.py" in text
        assert "scipy with `slicer.util.pip_install`" not in text


# --- Links and paths in the documentation -----------------------------------------------------------------
DOCS = ("README.md", "docs/*.md", "experiments/README.md", "bench/README.md", "DRSegUNetLib/models/MODEL_CARD.md")
TOP_FOLDERS = ("DRSegUNet", "DRSegUNetLib", "Testing", "bench", "docs", "experiments", "scripts")


def _docs() -> list[Path]:
    return sorted({p for pattern in DOCS for p in REPO.glob(pattern)})


def _strip_fences(text: str) -> str:
    return re.sub(r"^(```|~~~).*?^\1[^\n]*$", "", text, flags=re.M | re.S)


def _without_code(text: str) -> str:
    """Markdown without fenced blocks and code spans (where a [x](y) is an example, not a link)."""
    return re.sub(r"`[^`\n]*`", "", _strip_fences(text))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_markdown_links_resolve() -> None:
    """Every relative link and image of the docs names a file of the repository (relative to the
    document), and every #anchor a heading of the document it points into."""
    link = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
    reference = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?", re.M)
    checked, broken = 0, []
    for doc in _docs():
        text = _without_code(doc.read_text(encoding="utf-8"))
        for target in link.findall(text) + reference.findall(text):
            if re.match(r"[a-z][a-z0-9+.-]*:", target, re.I):  # https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.relative_to(REPO)}: {target} (no {path})")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", _strip_fences(dest.read_text(encoding="utf-8")), re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{doc.relative_to(REPO)}: {target} (no heading #{anchor} in {dest.name})")
    assert checked >= 4, "the link pattern finds no links any more"
    assert not broken, "broken links:\n  " + "\n  ".join(broken)


def test_repository_paths_named_in_docs_exist() -> None:
    """A file path of this repository that the docs name (``docs/crossval.md``, ``bench/hu_lungs.py``),
    from the repository root or from the document's folder, exists: moved files leave no stale
    pointers. Folders and settings keys (``DRSegUNet/DataFolder``) have no file extension and are not checked."""
    path = re.compile(r"(?<![\w./~$-])((?:%s)/[\w./-]*\w\.[A-Za-z]{1,5})\b" % "|".join(TOP_FOLDERS))
    checked, missing = 0, []
    for doc in _docs():
        for number, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            for name in path.findall(line):
                checked += 1
                if not ((REPO / name).exists() or (doc.parent / name).exists()):
                    missing.append(f"{doc.relative_to(REPO)}:{number}: {name}")
    assert checked >= 20, "the path pattern finds no paths any more"
    assert not missing, "the docs name files that do not exist:\n  " + "\n  ".join(missing)
