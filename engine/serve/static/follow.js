// Keeps the newest message in view while a reply streams, as chat apps do: the page follows it as long as the user
// is at the bottom; scrolling up stops that (what they are reading stays put), and the "Jump to latest" button
// scrolls back down and follows again. The visible area ends at the message box, which sticks to the bottom.

const SLACK = 48; // px below the visible area that still count as "at the bottom"

export function createFollower(button, latest, composer) {
  let following = true;

  // How far the latest message's bottom edge is below the visible area (px; <= 0: it is in view).
  function gap() {
    const element = latest();
    if (!element) return 0;
    const visibleBottom = Math.min(window.innerHeight, composer.getBoundingClientRect().top);
    return element.getBoundingClientRect().bottom - visibleBottom;
  }

  function update() {
    button.hidden = following || gap() <= SLACK;
  }

  function scrollToLatest() {
    const g = gap();
    if (g > 0) window.scrollBy(0, Math.ceil(g) + 8);
  }

  window.addEventListener("scroll", () => {
    following = gap() <= SLACK; // the user scrolled up (or back down to the latest)
    update();
  }, { passive: true });
  window.addEventListener("resize", () => { if (following) scrollToLatest(); update(); });
  button.addEventListener("click", () => {
    following = true;
    scrollToLatest();
    update();
  });

  return {
    // After the latest message grew: keep it in view when following; else offer the button.
    follow() {
      if (following) scrollToLatest();
      update();
    },
    // A new message from the user: follow again.
    reset() {
      following = true;
      scrollToLatest();
      update();
    },
    get following() { return following; },
  };
}
