"""Build kagent: generate the protobuf modules and compile the Cython fast path.

The protobuf modules are generated from kagent/protocols/*.proto with grpcio-tools
(protoc) at build time, so the .proto files stay the single source of truth.
The Cython extensions are optional: when they cannot be built the pure-Python
twins are used, and the build says so loudly.
"""

import glob
import os
import re
import sys

from setuptools import Command, Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.build_py import build_py as _build_py

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join("kagent", "protocols")


def _version() -> str:
    with open(os.path.join(HERE, "kagent", "__init__.py")) as f:
        return re.search(r'__version__ = "([^"]+)"', f.read()).group(1)


class build_protos(Command):
    """Generate kagent/protocols/*_pb2.py from the .proto files beside them."""

    description = "generate protobuf modules with grpcio-tools"
    user_options: list = []

    def initialize_options(self) -> None:
        pass

    def finalize_options(self) -> None:
        pass

    def run(self) -> None:
        import grpc_tools
        from grpc_tools import protoc

        protos = sorted(glob.glob(os.path.join(HERE, PROTO_DIR, "*.proto")))
        if not protos:
            return
        include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
        out = os.path.join(HERE, PROTO_DIR)
        args = ["protoc", f"-I{out}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}"]
        rc = protoc.main(args + protos)
        if rc != 0:
            raise SystemExit(f"protoc failed ({rc}) on {', '.join(map(os.path.basename, protos))}")
        local = {os.path.basename(p)[:-6] for p in protos}
        for path in glob.glob(os.path.join(out, "*_pb2.py")) + glob.glob(os.path.join(out, "*_pb2.pyi")):
            self._relative_imports(path, local)
        print(f"kagent: generated protobuf modules for {len(protos)} .proto files", file=sys.stderr)

    @staticmethod
    def _relative_imports(path: str, local: set) -> None:
        # protoc emits "import oci_pb2 as ..."; inside a package these must be relative.
        with open(path) as f:
            text = f.read()
        fixed = re.sub(
            r"^import (\w+)_pb2 as (\w+)$",
            lambda m: f"from . import {m.group(1)}_pb2 as {m.group(2)}" if m.group(1) in local else m.group(0),
            text,
            flags=re.M,
        )
        fixed = re.sub(
            r"^import (\w+)_pb2$",
            lambda m: f"from . import {m.group(1)}_pb2" if m.group(1) in local else m.group(0),
            fixed,
            flags=re.M,
        )
        if fixed != text:
            with open(path, "w") as f:
                f.write(fixed)


def _extensions() -> list:
    if os.environ.get("KAGENT_NO_EXTENSIONS") == "1":
        return []
    sources = sorted(glob.glob(os.path.join("kagent", "_fast", "*.pyx")))
    return [
        Extension(
            "kagent._fast." + os.path.basename(src)[:-4],
            [src],
            extra_compile_args=["-O2"],
        )
        for src in sources
    ]


class build_ext(_build_ext):
    """Cythonize and compile; a failure leaves the pure-Python twins in charge."""

    def finalize_options(self) -> None:
        # Cythonize before setuptools finalizes the extension list: replacing
        # the Extension objects later loses fields setuptools adds to them.
        self._cython_error = None
        if self.distribution.ext_modules:
            try:
                from Cython.Build import cythonize

                self.distribution.ext_modules = cythonize(
                    self.distribution.ext_modules,
                    language_level=3,
                    compiler_directives={"boundscheck": True, "wraparound": False},
                    quiet=True,
                )
            except Exception as exc:  # report, never hide
                self._cython_error = exc
                self.distribution.ext_modules = []
        super().finalize_options()

    def run(self) -> None:
        self.run_command("build_protos")
        if self._cython_error is not None:
            print(f"kagent: fast path NOT built (cythonize: {self._cython_error}); "
                  "the pure-Python twins will be used", file=sys.stderr)
            return
        if not self.extensions:
            print("kagent: fast path NOT built (KAGENT_NO_EXTENSIONS=1): pure-Python twins", file=sys.stderr)
            return
        try:
            super().run()
        except Exception as exc:  # report, never hide
            print(f"kagent: fast path NOT built ({exc}); the pure-Python twins will be used", file=sys.stderr)
            return
        names = ", ".join(e.name.rsplit(".", 1)[1] for e in self.extensions)
        print(f"kagent: fast path built (compiled: {names})", file=sys.stderr)


class build_py(_build_py):
    def run(self) -> None:
        self.run_command("build_protos")
        super().run()


setup(
    name="kagent",
    version=_version(),
    description="A Python implementation of the Kata Containers guest agent",
    python_requires=">=3.11",
    install_requires=[
        line.split("#")[0].strip()
        for line in open(os.path.join(HERE, "requirements.txt"))
        if line.split("#")[0].strip()
    ],
    packages=[
        "kagent",
        "kagent._fast",
        "kagent.cli",
        "kagent.protocols",
        "kagent.service",
        "kagent.ttrpc",
        "kagent.runtime",
        "kagent.cgroups",
        "kagent.devices",
        "kagent.storage",
        "kagent.worker",
    ],
    package_data={"kagent.protocols": ["*.proto", "*_pb2.pyi"], "kagent._fast": ["*.pyx", "*.pxd"]},
    ext_modules=_extensions(),
    cmdclass={"build_protos": build_protos, "build_ext": build_ext, "build_py": build_py},
    entry_points={
        "console_scripts": [
            "kagent = kagent.__main__:main",
            "kagent-ctl = kagent.cli.ctl:main",
        ]
    },
)
