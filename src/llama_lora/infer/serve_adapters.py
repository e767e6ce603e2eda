"""What `llama-lora serve` serves: the names clients may ask for (the base, each adapter), loaded at start-up
and, with `--allow-adapter-updates`, loaded and unloaded while it runs (vLLM's and SGLang's
`POST /v1/load_lora_adapter` / `/v1/unload_lora_adapter`).

Every adapter is a PEFT named adapter on the one shared base. An adapter trained on another base is refused
by its fingerprint (shapes and sampled weights of the base it was trained on), at start-up and at run time
alike. A run-time change goes through the engine's thread between two decode steps (`Engine.call`), since
that thread alone runs the model; an unload waits until no request of that adapter is running or waiting,
and the name stops answering at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
from dataclasses import dataclass
from pathlib import Path

from llama_lora import run_dir
from llama_lora.data import templates
from llama_lora.errors import LlamaLoraError
from llama_lora.infer import loading
from llama_lora.infer.serve_api import ApiError
from llama_lora.meta import fingerprint_matches
from llama_lora.model import adapters, loader


class ServeError(LlamaLoraError):
    pass


@dataclass
class Served:
    """One name clients can ask for: the shared model with one adapter active (`adapter`) or none."""

    name: str
    adapter: str | None  # PEFT adapter name; None is the base alone
    loaded: loading.Loaded  # shares model and tokenizer; its own template and system prompt


def run_name(path: str) -> str:
    """The name a run directory or adapter directory is served under when none is given: its run's."""
    p = Path(path).resolve()
    return p.parent.name if p.name == "adapter" else p.name


def parse_adapter_specs(specs: list[str]) -> list[tuple[str, str]]:
    """`--adapter NAME=RUN_DIR` (or a bare RUN_DIR, named after its run directory) -> [(name, path)]."""
    out = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = run_name(spec), spec
        if not name or not path:
            raise ServeError(f"--adapter: {spec!r} should be NAME=RUN_DIR")
        out.append((name, path))
    return out


def plan_served(
    model: str | None, adapter_specs: list[tuple[str, str]]
) -> tuple[str | None, list[tuple[str, str]]]:
    """(base model or None, [(name, path)] of the adapters): a positional run or adapter directory
    (`model`) is the first adapter, named after its run, on the base it was trained on."""
    specs = list(adapter_specs)
    base = model
    if model is not None and run_dir.adapter_dir_of(model) is not None:
        specs.insert(0, (run_name(model), model))
        base = None
    if base is None and not specs:
        raise ServeError("serve: give a MODEL, a RUN_DIR or --adapter NAME=RUN_DIR")
    names = [n for n, _ in specs]
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ServeError(f"--adapter: the name {doubled[0]} is given twice")
    return base, specs


def load_served(
    model: str | None,
    adapter_specs: list[tuple[str, str]],
    device: str = "auto",
    log=print,
    precision: str = "auto",
) -> dict[str, Served]:
    """The names to serve: the base under its model name, each adapter under its own. A positional run
    directory (`model`) is one more adapter, named after the directory, on the base it was trained on.
    `precision` is generation's (`loading.load`)."""
    base, specs = plan_served(model, adapter_specs)
    first = specs[0][1] if specs else None
    loaded = loading.load(
        base=base, adapter=first, device=device, merge_in_memory=False, log=log, precision=precision
    )
    base_name = base or (loaded.source.base_name if loaded.source else "")
    if base_name in [n for n, _ in specs]:
        raise ServeError(f"--adapter: {base_name} is the base model's name; name the adapter otherwise")
    if not specs:
        return {base_name: Served(base_name, None, loaded)}
    base_view = dataclasses.replace(
        loaded, template=templates.choose_template(loaded.tokenizer, "auto"), system_prompt=None, source=None
    )
    served = {
        base_name: Served(base_name, None, base_view),
        specs[0][0]: Served(specs[0][0], "default", loaded),
    }
    for i, (name, path) in enumerate(specs[1:], 1):
        served[name] = add_served_adapter(loaded, base_name, name, path, f"adapter{i}")
    loaded.model.eval()
    return served


def add_served_adapter(
    loaded: loading.Loaded, base_name: str, name: str, path: str, peft_name: str, label: str = ""
) -> Served:
    """Load one more adapter onto the shared model as PEFT adapter `peft_name`, refusing one trained on
    another base; its view keeps the template and system prompt it was trained with. A base served alone
    until now becomes a PeftModel holding this adapter (the view's `loaded.model`)."""
    label = label or f"--adapter {name}"
    src = loading.find_adapter(path)
    loader.refuse_pickled(src.adapter_dir, src.cfg.model.allow_pickle if src.cfg else False, key=label)
    same = (
        fingerprint_matches(src.fingerprint, loaded.model)
        if src.fingerprint is not None
        else src.base_name == base_name
    )
    if not same:
        raise ServeError(
            f"{label}: {path} was trained on {src.base_name}, not on the base the others use "
            f"({base_name}); serve it from a server of its own"
        )
    model = loaded.model
    try:
        if hasattr(model, "peft_config"):
            adapters.add_adapter(model, src.adapter_dir, peft_name)
        else:
            model = adapters.load_adapter(model, src.adapter_dir, peft_name).eval()
    except RuntimeError as exc:  # size mismatch: an adapter made for another architecture
        raise ServeError(f"{label}: {path} does not fit {base_name}: {str(exc).splitlines()[0]}") from None
    trained = src.template or (src.cfg.data.template if src.cfg else None) or "auto"
    view = dataclasses.replace(
        loaded,
        model=model,
        template=templates.choose_template(loaded.tokenizer, trained),
        system_prompt=src.cfg.data.system_prompt if src.cfg else None,
        source=src,
        description=f"{base_name} + adapter {src.adapter_dir}",
    )
    return Served(name, peft_name, view)


class AdapterUpdates:
    """`POST /v1/load_lora_adapter` and `/v1/unload_lora_adapter` over the served names (`served`, changed in
    place: the endpoints read it) and the worker's engine. Refused unless `allowed` (--allow-adapter-updates)."""

    def __init__(self, served: dict[str, Served], worker, allowed: bool, log=print):
        self.served, self.worker, self.allowed, self.log = served, worker, allowed, log
        self.pending: set[str] = set()  # names being loaded (two loads of one name: the second is refused)
        self.peft_names = (f"runtime{i}" for i in itertools.count())

    def _check(self, body: dict, keys: tuple[str, ...]) -> list[str]:
        if not self.allowed:
            raise ApiError(403, "adapter updates are off; start serve with --allow-adapter-updates")
        values = [body.get(k) for k in keys]
        for key, value in zip(keys, values):
            if not isinstance(value, str) or not value:
                raise ApiError(400, f"'{key}' must be a non-empty string", key)
        return values

    async def load(self, body: dict) -> str:
        name, path = self._check(body, ("lora_name", "lora_path"))
        if name in self.served or name in self.pending or ":" in name:
            taken = "is already served" if name in self.served or name in self.pending else "contains ':'"
            raise ApiError(400, f"the adapter name {name!r} {taken}", "lora_name")
        base = next(s for s in self.served.values() if s.adapter is None)
        self.pending.add(name)
        try:
            engine = self.worker.engine_for(base)
            added = await asyncio.wrap_future(
                engine.call(lambda: self._add(engine, base, name, path, next(self.peft_names)))
            )
        except LlamaLoraError as exc:
            raise ApiError(400, str(exc), "lora_path") from None
        finally:
            self.pending.discard(name)
        self.served[name] = added
        self.log(f"serve: loaded adapter {name} from {path}")
        return f"Success: LoRA adapter '{name}' added successfully."

    def _add(self, engine, base: Served, name: str, path: str, peft_name: str) -> Served:
        """In the engine's thread: the adapter onto the shared model; when that turned a base served alone
        into a PeftModel, the engine and every served name use the new model."""
        try:
            added = add_served_adapter(base.loaded, base.name, name, path, peft_name, label=f"adapter {name}")
        except loading.InferenceError as exc:  # find_adapter speaks of the command line's --adapter
            raise ServeError(str(exc).removeprefix("--adapter: ")) from None
        if added.loaded.model is not engine.model:
            engine.model = added.loaded.model
            for key, s in self.served.items():
                self.served[key] = dataclasses.replace(
                    s, loaded=dataclasses.replace(s.loaded, model=engine.model)
                )
        engine.prepare(added.adapter)  # its bf16 copies (where the engine decodes in bf16) made now
        return added

    async def unload(self, body: dict) -> str:
        (name,) = self._check(body, ("lora_name",))
        gone = self.served.get(name)
        if gone is None:
            raise ApiError(404, f"the adapter {name!r} is not served", "lora_name")
        if gone.adapter is None:
            raise ApiError(400, f"{name!r} is the base model, not an adapter", "lora_name")
        del self.served[name]  # new requests for it get 404 from now on
        engine = self.worker.engine_for(gone)
        model = gone.loaded.model

        def remove() -> None:
            model.delete_adapter(gone.adapter)
            engine.forget(gone.adapter)

        await asyncio.wrap_future(engine.call(remove, after=gone.adapter))
        self.log(f"serve: unloaded adapter {name}")
        return f"Success: LoRA adapter '{name}' removed successfully."
