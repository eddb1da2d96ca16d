pytest_plugins = ["kvmtests.verdict.plugin", "pytester"]
