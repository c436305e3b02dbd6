"""Launching a Triton kernel from its compiled form after the first call.

Triton's own launch path (`kernel[grid](...)`) binds and specializes every argument, compares
the kernel's globals with their values at compile time and, for an autotuned kernel, rebuilds
the tuning key, all in Python on every call. Timed on this 2-core host with the GPU launch a
no-op (`python tests/sm90_checks.py host-time`), an embedding lookup call takes 65-77 us
through it and 15-23 us launching the compiled kernel that path returned
(`CompiledKernel[grid](*args)`), Triton 3.6 and 3.9 alike. The lookup's GPU work is about 10 us,
so Triton's path, not the GPU, bounded our public call (bench/notes/results-2026-11.md, gpu_embedding).

`LaunchCache` keeps, per specialization key, the compiled kernel (and the autotuner's choice)
from the first call made through Triton's own path, and launches it directly afterwards. The
key is finer than Triton's specialization: the dtype and 16-byte alignment of every tensor; for
every int, whether it is 1, a multiple of 16, and its integer width; exact values for constexpr
and autotuning-key arguments and for keyword arguments. A compiled kernel is therefore only
reused for arguments that Triton would have compiled the same way; tests/sm90_checks.py checks
this against Triton's own binder. The compiled kernel takes every argument of the kernel's
signature in order, constexprs included, as Triton's own launch passes them (checked on Triton
3.6.0, 3.7.1, 3.8.0 and 3.9.0); other versions launch through Triton's path, with a warning.
Triton's per-call checks that the direct launch skips: its debug and instrumentation knobs are
read at a key's first call only, and a kernel's globals are not compared again.
"""
import threading

import torch
import triton
from triton.runtime.autotuner import Autotuner
from triton.runtime.driver import driver

from ._backend import triton_interpreted, warn_once

FAST_LAUNCH_VERSIONS = ((3, 6), (3, 7), (3, 8), (3, 9))


def _triton_version():
    return tuple(int(part) for part in triton.__version__.split(".")[:2])


def _int_key(value):
    # Triton specializes ints on == 1 and on divisibility by 16, and types them i32, i64 or u64 by range.
    return (value == 1, value % 16 == 0, -2**31 <= value < 2**31, value < 2**63)


class LaunchCache:
    """`launch(grid, *args, **kwargs)` does what `kernel[grid](*args, **kwargs)` does.

    `kernel` is a @triton.jit function or a @triton.autotune of one. Positional arguments come
    first in the kernel's order; keyword arguments may only be constexprs and launch options
    (num_warps, ...). `grid` is a tuple or, as with Triton, a function of the arguments by name
    (the autotuned configuration's included).
    """

    def __init__(self, kernel):
        self.kernel = kernel
        self.checked_version = _triton_version() in FAST_LAUNCH_VERSIONS
        self.fast = self.checked_version and not triton_interpreted()   # the interpreter has no compiled form
        self.compiled = {}
        self.lock = threading.Lock()   # first calls: the autotuner keeps a call's arguments on itself
        if not self.fast:
            return
        self.autotuner = kernel if isinstance(kernel, Autotuner) else None
        jit = kernel.fn if self.autotuner else kernel
        assert not jit.pre_run_hooks, "pre-run hooks must run on every call: use Triton's path"
        self.names = [param.name for param in jit.params]
        self.defaults = {param.name: param.default for param in jit.params if param.has_default}
        exact = {param.name for param in jit.params if param.is_constexpr}
        if self.autotuner:
            # A pre-hook (reset_to_zero, restore_value, a config's own) must run on every call.
            assert not (self.autotuner.reset_to_zero or self.autotuner.restore_value
                        or any(config.pre_hook for config in self.autotuner.configs)), "hooks need Triton's path"
            exact |= set(self.autotuner.keys)
        self.exact = [name in exact for name in self.names]

    def key(self, args, kwargs):
        key = [driver.active.get_current_device()]
        for value, exact in zip(args, self.exact):
            if exact:
                key.append(value)
            elif type(value) is int:
                key.append(_int_key(value))
            elif isinstance(value, torch.Tensor):
                key.append((value.dtype, value.data_ptr() % 16 == 0))
            elif isinstance(value, float):
                key.append(float)   # Triton passes floats as fp32, unspecialized
            elif value is None or isinstance(value, (bool, str)):
                key.append(value)
            else:
                raise TypeError(f"LaunchCache cannot key an argument of type {type(value).__name__}")
        if kwargs:
            key.append(tuple(sorted(kwargs.items())))
        return tuple(key)

    def __call__(self, grid, *args, **kwargs):
        if not self.fast:
            if not self.checked_version and not triton_interpreted():
                warn_once("triton-launch", f"triton {triton.__version__} is not one the direct launch was checked "
                          f"on {FAST_LAUNCH_VERSIONS}: kernels launch through Triton's slower Python path")
            with self.lock:
                self.kernel[grid](*args, **kwargs)
            return
        key = self.key(args, kwargs)
        entry = self.compiled.get(key)
        if entry is None:
            # Values keyed exactly must be plain: a tensor there would key by identity and never repeat.
            exact = [value for value, exact in zip(args, self.exact) if exact] + list(kwargs.values())
            if not all(value is None or isinstance(value, (bool, int, float, str)) for value in exact):
                raise TypeError("LaunchCache: constexpr, autotuning-key and keyword arguments must be "
                                "None, bool, int, float or str")
            with self.lock:
                compiled = self.kernel[grid](*args, **kwargs)
                assert compiled is not None, "Triton returned no compiled kernel (a JIT cache hook?)"
                chosen = self.autotuner.best_config.all_kwargs() if self.autotuner else {}
                named = {**self.defaults, **kwargs, **chosen}
                # The compiled kernel takes the rest of the signature after the positional arguments.
                tail = tuple(named[name] for name in self.names[len(args):])
                self.compiled[key] = (compiled, tail, named)
            return
        compiled, tail, named = entry
        if callable(grid):
            grid = grid({**dict(zip(self.names, args)), **named})
        compiled[tuple(grid) + (1,) * (3 - len(grid))](*args, *tail)
