@echo off
rem Sets up the environment run.bat and update.bat work in. Everything stays inside this folder:
rem the Python packages (.venv), the models (hf_download), caches, temporary files and logs.
rem Your own settings go in user.bat beside this file; it runs after the defaults below.
rem Leaves FRAMEPACK_PYTHON undefined, after saying why, when no usable Python is found.

rem %~dp0 is the folder of this file, whatever the current directory; it ends with a backslash.
set "FRAMEPACK_HOME=%~dp0"
set "FRAMEPACK_HOME=%FRAMEPACK_HOME:~0,-1%"
set "FRAMEPACK_SYSTEM=%FRAMEPACK_HOME%\system"

rem Models go beside the app, unless HF_HOME is already set to a folder of models you have.
if not defined HF_HOME set "HF_HOME=%FRAMEPACK_HOME%\hf_download"
set "PIP_CACHE_DIR=%FRAMEPACK_HOME%\cache\pip"
set "TORCH_HOME=%FRAMEPACK_HOME%\cache\torch"
set "TEMP=%FRAMEPACK_HOME%\temp"
set "TMP=%FRAMEPACK_HOME%\temp"
set "GRADIO_TEMP_DIR=%FRAMEPACK_HOME%\temp\gradio"
if not exist "%FRAMEPACK_HOME%\temp" mkdir "%FRAMEPACK_HOME%\temp" >nul 2>&1

rem Python in UTF-8 mode, blind to packages and settings of other Python installations.
set "PYTHONUTF8=1"
set "PYTHONIOENCODING=utf-8"
set "PYTHONNOUSERSITE=1"
set "PYTHONHOME="
set "PYTHONPATH="
set "PIP_DISABLE_PIP_VERSION_CHECK=1"

rem A portable Git beside the scripts comes first.
if exist "%FRAMEPACK_SYSTEM%\git\cmd\git.exe" set "PATH=%FRAMEPACK_SYSTEM%\git\cmd;%PATH%"

if exist "%FRAMEPACK_HOME%\user.bat" call "%FRAMEPACK_HOME%\user.bat"

rem The Python that installs and starts FramePack: FRAMEPACK_PYTHON if set (user.bat may set it),
rem else a portable one in system\python, else an installed one found by the py launcher, else python.
if defined FRAMEPACK_PYTHON goto :python_found
if not exist "%FRAMEPACK_SYSTEM%\python\python.exe" goto :find_installed_python
set "FRAMEPACK_PYTHON=%FRAMEPACK_SYSTEM%\python\python.exe"
set "FRAMEPACK_PYTHON_ARGS="
set "PATH=%FRAMEPACK_SYSTEM%\python;%FRAMEPACK_SYSTEM%\python\Scripts;%PATH%"
goto :python_found

:find_installed_python
call :try_py 3.12
call :try_py 3.11
call :try_py 3.10
call :try_py 3.13
call :try_python
if defined FRAMEPACK_PYTHON goto :python_found
echo.
echo   FramePack needs Python 3.10 to 3.13, and none was found.
echo   Install Python 3.12 from https://www.python.org/downloads/windows/
echo   and tick "Add python.exe to PATH" in the installer; then start run.bat again.
echo   Or put a portable Python in "%FRAMEPACK_SYSTEM%\python".
echo.
exit /b 1

:python_found
exit /b 0

rem Uses "py -X.Y" when the py launcher has that version. (No "||" here: Wine's cmd runs what
rem follows it even after success, and the tests run these files under Wine.)
:try_py
if defined FRAMEPACK_PYTHON exit /b 0
py -%1 -c "import sys" >nul 2>&1
if errorlevel 1 exit /b 0
set "FRAMEPACK_PYTHON=py"
set "FRAMEPACK_PYTHON_ARGS=-%1"
exit /b 0

rem Uses "python" from PATH if it is a supported version; the Microsoft Store's stand-in is not.
:try_python
if defined FRAMEPACK_PYTHON exit /b 0
python -c "import sys; sys.exit(not (3, 10) <= sys.version_info[:2] <= (3, 13))" >nul 2>&1
if errorlevel 1 exit /b 0
set "FRAMEPACK_PYTHON=python"
set "FRAMEPACK_PYTHON_ARGS="
exit /b 0
