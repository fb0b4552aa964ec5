"""A1111 runs this on every start (``python install.py``, A1111's root on PYTHONPATH).

Installs only the runtime packages that are missing (see lib_sd3/requirements.py), each with
``launch.run_pip`` and a constraints file that holds every installed package where it is, so
nothing A1111 pinned is ever upgraded or downgraded. Prints nothing and calls no pip when
nothing is missing, so start-up stays fast and works offline.
"""

import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from lib_sd3 import requirements  # noqa: E402


def main() -> int:
    try:
        import launch
    except ImportError:  # run by hand outside A1111: say what is missing, install nothing
        absent = requirements.missing(requirements.installed_here)
        if absent:
            print(f"[SD3] missing packages; install them with: {requirements.manual_command(sys.executable, absent)}")
        return 1 if absent else 0

    absent = requirements.missing(launch.is_installed)
    if not absent:
        return 0
    constraints = requirements.freeze_constraints(requirements.installed_distributions())
    failed = []
    with tempfile.TemporaryDirectory(prefix="sd3-install-") as folder:
        path = os.path.join(folder, "constraints.txt")
        with open(path, "w", encoding="utf-8") as file:
            file.write(constraints)
        for requirement in absent:
            try:
                launch.run_pip(requirements.pip_install_args(requirement, path), f"sd-webui-sd3 requirement: {requirement.dist}")
            except Exception as error:  # offline, no wheel for this platform...: the rest still installs
                failed.append(requirement)
                reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
                print(f"[SD3] could not install {requirement.dist} ({reason}); without it: {requirement.needed_for}")
    if failed:
        print(f"[SD3] install by hand with: {requirements.manual_command(sys.executable, failed)}")
    return 0  # A1111 keeps starting; features that need a missing package disable themselves


if __name__ == "__main__":
    sys.exit(main())
