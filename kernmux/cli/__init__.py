"""kernmux.cli"""
