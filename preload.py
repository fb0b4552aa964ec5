"""Command-line flags of sd-webui-sd3 (A1111 calls ``preload`` before parsing its arguments)."""

import argparse


def preload(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sd-webui-sd3")
    group.add_argument("--sd3-t5", choices=("auto", "fp16", "fp8", "off"), default=None,
                       help="SD3: T5-XXL text encoder precision, or off (overrides the setting)")
    group.add_argument("--sd3-no-fetch", action="store_true",
                       help="SD3: never download anything (T5, tokenizers); use what is on disk")
    group.add_argument("--sd3-mirror", default=None,
                       help="SD3: comma-separated Hugging Face endpoints to try in order, e.g. https://hf-mirror.com")
    group.add_argument("--sd3-mixdq", default=None,
                       help="SD3: quantize the MMDiT at load: off, w8a8, w4a8, fp8 or a path to a MixDQ YAML config")
