"""FramePack in the browser: `python demo_gradio.py [--tiny] [--port N] ...` (see --help)."""

from diffusers_helper.app import main

if __name__ == "__main__":
    main()
