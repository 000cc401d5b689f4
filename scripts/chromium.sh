# Sourced by scripts/test: the browser tests drive Debian's chromium (Playwright's own browser
# download is not used), with a CJK font so screenshots of Chinese chats are readable.
if ! command -v chromium >/dev/null || ! fc-list 2>/dev/null | grep -qi "wenquanyi"; then
  sudo=$([ "$(id -u)" = 0 ] || echo sudo)
  $sudo apt-get update -q && $sudo apt-get install -y -q chromium fonts-wqy-zenhei
fi
