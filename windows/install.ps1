# relayd installer for Windows. Run it from the unpacked zip, in an Administrator PowerShell:
#     powershell -ExecutionPolicy Bypass -File .\install.ps1            (install or upgrade)
#     powershell -ExecutionPolicy Bypass -File .\install.ps1 -Uninstall
# The steps themselves are relayd.wininstall's (in the bundled Python), so that they are the
# same here and in the tests: copy to %ProgramFiles%\relayd, make %ProgramData%\relayd with
# its access list and a sample config (an upgrade keeps config, queue and tokens), register
# the service, add relayd to PATH, and start the service once `relayd check` accepts the config.
#Requires -RunAsAdministrator
param([switch]$Uninstall, [switch]$NoStart)
$ErrorActionPreference = "Stop"
$here = Split-Path -Parent $MyInvocation.MyCommand.Path
$python = Join-Path $here "python\python.exe"
if ($Uninstall) {
    & $python -m relayd.wininstall uninstall
} elseif ($NoStart) {
    & $python -m relayd.wininstall install --from $here --no-start
} else {
    & $python -m relayd.wininstall install --from $here
}
exit $LASTEXITCODE
