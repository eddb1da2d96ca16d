pytest_plugins = ["kvmtests.plugin"]
