"""Remote code: make a checkpoint folder loadable where only transformers is installed (`trust_remote_code=True`).

transformers' own route (`register_for_auto_class` + `save_pretrained`, hf-conventions §3) sets a class attribute that
stays set for every later save in the process, and it copies only files reached by relative imports. Our sources span
two packages (`storm_transformers.processing_storm` imports `storm_transformers.configuration_storm`), while a remote-code
folder is imported as one flat package (`transformers_modules.<folder>`). So `write_remote_code`:

1. copies the source file of every class an Auto class loads, and every file they import from our packages, flat into
   the folder, rewriting `from storm_transformers.configuration_storm import x` to `from .configuration_storm import x`;
2. refuses any import that would not work there: `import storm_transformers`, `from storm_transformers import x` (a package
   `__init__`), two copied files with one name, or a third-party package other than those transformers needs
   (imports inside `try:` are optional, as transformers' `check_imports` treats them);
3. writes `auto_map` into `config.json` and `processor_config.json` (the video processor's nested entry included), as
   `register_for_auto_class` would.
"""

import ast
import inspect
import json
import re
import sys
from pathlib import Path

OUR_PACKAGES = ("storm_transformers",)
# What remote code may import besides the standard library: transformers and the packages it needs for our classes.
ALLOWED_PACKAGES = {"torch", "transformers", "huggingface_hub", "numpy", "av"}


def _auto_classes() -> dict[str, dict[str, type]]:
    """Auto class → class, grouped by the JSON file whose `auto_map` names them."""
    from storm_transformers import (
        StormConfig,
        StormForConditionalGeneration,
        StormModel,
        StormProcessor,
        StormVideoProcessor,
    )

    model = {
        "AutoConfig": StormConfig,
        "AutoModel": StormModel,
        "AutoModelForImageTextToText": StormForConditionalGeneration,
    }
    return {
        "config.json": model,
        "processor_config.json": {"AutoProcessor": StormProcessor},
        "processor_config.json:video_processor": {"AutoVideoProcessor": StormVideoProcessor},
    }


def _reference(cls: type) -> str:
    """`auto_map` value of `cls` in the flat folder: `"<file stem>.<class name>"`."""
    return f"{cls.__module__.rsplit('.', 1)[-1]}.{cls.__name__}"


def flatten_sources(entry_files: list[Path]) -> dict[str, str]:
    """Source text of `entry_files` and of every file they import from our packages, keyed by file name, with our
    package imports made relative.

    Raises:
        ValueError: an import that cannot work in a flat folder or needs a package transformers does not bring (the
        message names the file, the line and the fix).
    """
    sources: dict[str, str] = {}
    origins: dict[str, Path] = {}
    queue = [Path(path).resolve() for path in entry_files]
    while queue:
        path = queue.pop()
        if path.name in sources:
            if origins[path.name] != path:
                raise ValueError(
                    f"Two source files are both named {path.name} ({origins[path.name]}, {path}); "
                    "remote code is one flat folder. Rename one of them."
                )
            continue
        text, dependencies = _flatten_imports(path)
        sources[path.name], origins[path.name] = text, path
        queue.extend(dependencies)
    return sources


def _flatten_imports(path: Path) -> tuple[str, list[Path]]:
    """`path`'s text with our absolute imports made relative, and the files it imports from our packages."""
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    tree = ast.parse("".join(lines), filename=str(path))
    optional = {id(node) for block in ast.walk(tree) if isinstance(block, ast.Try) for node in ast.walk(block)}
    dependencies = []
    for node in ast.walk(tree):
        where = f"{path}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import):
            for alias in node.names:
                _check_package(alias.name, where, optional=id(node) in optional)
        elif isinstance(node, ast.ImportFrom) and node.level == 1 and node.module:
            dependencies.append(path.parent / f"{node.module}.py")
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise ValueError(
                f"{where}: `from . import ...` or a parent-package import cannot be flattened; "
                "import from the module itself (`from .module import name`)."
            )
        elif isinstance(node, ast.ImportFrom):
            package, _, module = node.module.partition(".")
            if package not in OUR_PACKAGES:
                _check_package(node.module, where, optional=id(node) in optional)
                continue
            if not module or "." in module:
                raise ValueError(
                    f"{where}: `from {node.module} import ...` cannot be flattened; import from the "
                    f"defining module (`from {package}.<module> import name`)."
                )
            dependencies.append(path.parents[1] / package / f"{module}.py")
            line = node.lineno - 1
            lines[line], count = re.subn(
                rf"\bfrom\s+{re.escape(node.module)}\s+import\b", f"from .{module} import", lines[line]
            )
            if count != 1:
                raise ValueError(f"{where}: could not rewrite `from {node.module} import` on one line.")
    return "".join(lines), dependencies


def _check_package(module: str, where: str, optional: bool) -> None:
    top = module.split(".")[0]
    if top in OUR_PACKAGES:
        raise ValueError(
            f"{where}: `import {module}` cannot work in remote code; use `from {module}.<module> import name`."
        )
    if not optional and top not in ALLOWED_PACKAGES and top not in sys.stdlib_module_names:
        raise ValueError(
            f"{where}: remote code imports `{top}`, which transformers does not install. Import it inside a "
            f"`try:` block (optional) or use one of {sorted(ALLOWED_PACKAGES)}."
        )


def write_remote_code(folder: str | Path) -> list[str]:
    """Copy the STORM sources into the checkpoint `folder` (flat, our imports made relative) and add `auto_map` to its
    `config.json` and `processor_config.json`, so that `AutoModelForImageTextToText.from_pretrained(folder,
    trust_remote_code=True)` and `AutoProcessor.from_pretrained(folder, trust_remote_code=True)` work without
    storm-transformers installed. Returns the names of the copied files.

    Raises:
        FileNotFoundError: `folder` lacks `config.json` or `processor_config.json` (save the model and processor
        first).
        ValueError: a source import that cannot work as remote code (see `flatten_sources`).
    """
    folder = Path(folder)
    groups = _auto_classes()
    classes = [cls for group in groups.values() for cls in group.values()]
    sources = flatten_sources([Path(inspect.getfile(cls)) for cls in classes])
    for target in {key.split(":")[0] for key in groups}:
        if not (folder / target).is_file():
            raise FileNotFoundError(f"{folder / target} is missing: save the model and processor before the code.")
    for name, text in sources.items():
        (folder / name).write_text(text, encoding="utf-8")
    for key, group in groups.items():
        target, _, nested = key.partition(":")
        data = json.loads((folder / target).read_text(encoding="utf-8"))
        entry = data[nested] if nested else data
        entry["auto_map"] = {auto: _reference(cls) for auto, cls in group.items()}
        (folder / target).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return sorted(sources)
