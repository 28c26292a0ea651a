def main():
    import pilotfish.dns, importlib.metadata
    print(importlib.metadata.version("pilotfish"), pilotfish.dns.__file__)
