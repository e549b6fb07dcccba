"""The default mail and page templates (data only): the wheel installs them as careservice/templates."""
