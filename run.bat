@echo off
rem FramePack: double-click to start. The first start installs PyTorch for your GPU and the
rem other packages into .venv; the models download when the app first needs them.
rem Arguments are passed on to demo_gradio.py, e.g.  run.bat --port 7861
setlocal
call "%~dp0environment.bat"
if not defined FRAMEPACK_PYTHON goto :no_python
cd /d "%FRAMEPACK_HOME%"

rem cmd reads a batch file while running it, and update.bat may replace this one meanwhile,
rem so what follows is one block: cmd reads all of it before starting.
(
    "%FRAMEPACK_PYTHON%" %FRAMEPACK_PYTHON_ARGS% "%FRAMEPACK_HOME%\diffusers_helper\launcher.py" run %*
    if errorlevel 1 (
        echo.
        echo   FramePack stopped because of the error above.
        echo   The log files are in "%FRAMEPACK_HOME%\logs"
        echo.
        if not defined FRAMEPACK_NO_PAUSE pause
        exit /b 1
    )
    exit /b 0
)

:no_python
echo   Nothing was installed or started; no log was written because Python could not start.
echo.
if not defined FRAMEPACK_NO_PAUSE pause
exit /b 1
