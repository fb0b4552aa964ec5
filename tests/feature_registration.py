"""Register feature modules' declarations (``DECLARED``) as start-up does, for tests that use one feature."""


def registered(*modules):
    """Once per process, as :func:`lib_sd3.webui.startup.register` does at start-up."""
    from lib_sd3.webui import startup

    for module in modules:
        startup.register(module.DECLARED)
    return modules
