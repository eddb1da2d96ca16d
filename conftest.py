pytest_plugins = ["kvmtests.plugin", "pytester"]
