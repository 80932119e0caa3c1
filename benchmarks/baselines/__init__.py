"""Baselines the benchmarks measure sfbatch against, in the same run.

- :mod:`baselines.sequential`: the loop from SiliconFlow's API docs, one prompt after another.
- :mod:`baselines.threads`: the same loop in a ``ThreadPoolExecutor`` of 16.
- :mod:`baselines.img2dataset_baseline`: img2dataset downloading a list of image URLs.
"""
