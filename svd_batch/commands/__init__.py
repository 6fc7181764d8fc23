"""The console commands: each parses its arguments and calls the library (see pyproject's [project.scripts])."""
