@echo off
rem Updates FramePack: the code with git (your own edits that are in the way are set aside
rem with git stash, and the window says so), then the Python packages.
setlocal
call "%~dp0environment.bat"
if not defined FRAMEPACK_PYTHON goto :no_python
cd /d "%FRAMEPACK_HOME%"

rem git may replace this very file, and cmd reads a batch file while running it,
rem so what follows is one block: cmd reads all of it before starting.
(
    "%FRAMEPACK_PYTHON%" %FRAMEPACK_PYTHON_ARGS% "%FRAMEPACK_HOME%\diffusers_helper\launcher.py" update
    if errorlevel 1 (
        echo.
        echo   The update did not finish because of the error above.
        echo   The log files are in "%FRAMEPACK_HOME%\logs"
        echo.
        if not defined FRAMEPACK_NO_PAUSE pause
        exit /b 1
    )
    echo.
    echo   FramePack is up to date. Start it with run.bat.
    echo.
    if not defined FRAMEPACK_NO_PAUSE pause
    exit /b 0
)

:no_python
echo   Nothing was updated; no log was written because Python could not start.
echo.
if not defined FRAMEPACK_NO_PAUSE pause
exit /b 1
