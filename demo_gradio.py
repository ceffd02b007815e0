"""FramePack in the browser: `python demo_gradio.py [--tiny] [--port N] ...` (see --help)."""

from diffusers_helper.app import build_app, config_from_args, launch_options, parse_args

if __name__ == "__main__":
    args = parse_args()
    config = config_from_args(args)
    build_app(config).launch(**launch_options(args, config))
