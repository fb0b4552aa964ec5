"""Fake of ``libiclight/args.py``: the script args arrive as one dict, read back from ``p``."""

from modules import scripts


class ICLightArgs:
    def __init__(self, enabled: bool = False, model_type: str = "FC", input_fg=None, **_other):
        self.enabled = enabled
        self.model_type = model_type
        self.input_fg = input_fg

    @classmethod
    def fetch_from(cls, p):
        script_runner: scripts.ScriptRunner = p.scripts
        ic_light_script: scripts.Script = [
            script for script in script_runner.alwayson_scripts if script.title() == "IC Light"
        ][0]
        args = p.script_args[ic_light_script.args_from : ic_light_script.args_to]
        assert len(args) == 1
        return ICLightArgs(**args[0])
