"""Offline front ends (console scripts) over the trainer's modules: each `main(argv)`
parses, calls the library and turns its errors into one line and an exit code."""
