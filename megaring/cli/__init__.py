"""The command-line entry points: megaring-train, megaring-export, megaring-verify, megaring-plan."""
