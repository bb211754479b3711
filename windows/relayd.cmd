@echo off
rem relayd for Windows: every relayd command (serve, check, reload, queue, sendmail, ...).
"%~dp0python\python.exe" -m relayd %*
exit /b %ERRORLEVEL%
