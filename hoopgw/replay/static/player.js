// A small asciicast v2 player for the hoopgw replay server: no library,
// nothing fetched but the recording itself, from the same origin.
// It keeps a character screen (width x height), understands the control
// characters and the few ANSI sequences a shell session uses (cursor moves,
// erase line and screen); colours and other sequences are skipped.
"use strict";

(function () {
  function Screen(width, height) {
    this.width = width;
    this.height = height;
    this.reset();
  }

  Screen.prototype.reset = function () {
    this.rows = [];
    for (var i = 0; i < this.height; i++) this.rows.push(this.blank());
    this.x = 0;
    this.y = 0;
    this.pending = "";
  };

  Screen.prototype.blank = function () {
    return new Array(this.width + 1).join(" ").split("");
  };

  Screen.prototype.newline = function () {
    this.y += 1;
    if (this.y >= this.height) {
      this.rows.shift();
      this.rows.push(this.blank());
      this.y = this.height - 1;
    }
  };

  Screen.prototype.put = function (ch) {
    if (this.x >= this.width) {
      this.x = 0;
      this.newline();
    }
    this.rows[this.y][this.x] = ch;
    this.x += 1;
  };

  Screen.prototype.csi = function (params, final) {
    var numbers = params.replace("?", "").split(";").map(function (p) { return parseInt(p, 10); });
    var n = isNaN(numbers[0]) ? 1 : numbers[0];
    var i;
    switch (final) {
      case "A": this.y = Math.max(0, this.y - n); break;
      case "B": this.y = Math.min(this.height - 1, this.y + n); break;
      case "C": this.x = Math.min(this.width - 1, this.x + n); break;
      case "D": this.x = Math.max(0, this.x - n); break;
      case "G": this.x = Math.min(this.width - 1, Math.max(0, n - 1)); break;
      case "H":
      case "f":
        this.y = Math.min(this.height - 1, Math.max(0, (isNaN(numbers[0]) ? 1 : numbers[0]) - 1));
        this.x = Math.min(this.width - 1, Math.max(0, (isNaN(numbers[1]) ? 1 : numbers[1]) - 1));
        break;
      case "K":
        var mode = isNaN(numbers[0]) ? 0 : numbers[0];
        for (i = 0; i < this.width; i++) {
          if (mode === 2 || (mode === 0 && i >= this.x) || (mode === 1 && i <= this.x)) this.rows[this.y][i] = " ";
        }
        break;
      case "J":
        var how = isNaN(numbers[0]) ? 0 : numbers[0];
        if (how === 2 || how === 3) {
          for (i = 0; i < this.height; i++) this.rows[i] = this.blank();
        } else if (how === 0) {
          for (i = this.x; i < this.width; i++) this.rows[this.y][i] = " ";
          for (i = this.y + 1; i < this.height; i++) this.rows[i] = this.blank();
        }
        break;
      default:
        break; // colours (m) and modes (h, l): nothing to draw
    }
  };

  Screen.prototype.write = function (text) {
    text = this.pending + text;
    this.pending = "";
    for (var i = 0; i < text.length; i++) {
      var ch = text[i];
      if (ch === "\x1b") {
        var rest = text.slice(i);
        var match = /^\x1b\[([0-9;?]*)([@-~])/.exec(rest);
        if (match) {
          this.csi(match[1], match[2]);
          i += match[0].length - 1;
        } else if (/^\x1b\][^\x07]*(\x07|\x1b\\)/.test(rest)) {
          i += /^\x1b\][^\x07]*(\x07|\x1b\\)/.exec(rest)[0].length - 1;
        } else if (rest.length < 16 && /^\x1b(\[[0-9;?]*|\][^\x07]*)?$/.test(rest)) {
          this.pending = rest; // a sequence cut between two frames
          return;
        } else {
          i += 1; // a two-character escape
        }
      } else if (ch === "\r") {
        this.x = 0;
      } else if (ch === "\n") {
        this.newline();
      } else if (ch === "\b") {
        this.x = Math.max(0, this.x - 1);
      } else if (ch === "\t") {
        this.x = Math.min(this.width - 1, (Math.floor(this.x / 8) + 1) * 8);
      } else if (ch >= " ") {
        this.put(ch);
      }
    }
  };

  Screen.prototype.text = function () {
    return this.rows.map(function (row) { return row.join("").replace(/\s+$/, ""); }).join("\n").replace(/\n+$/, "");
  };

  function Player(root) {
    this.root = root;
    this.screenElement = root.querySelector(".screen");
    this.statusElement = root.querySelector(".status");
    this.playButton = root.querySelector(".play");
    this.speedSelect = root.querySelector(".speed");
    this.frames = [];
    this.position = 0; // index of the next frame
    this.clock = 0; // seconds of the recording already played
    this.timer = null;
    this.setState("loading");
    var self = this;
    this.playButton.addEventListener("click", function () { self.toggle(); });
    fetch(root.dataset.cast, { credentials: "same-origin" })
      .then(function (response) {
        if (!response.ok) throw new Error("the server answered " + response.status);
        return response.text();
      })
      .then(function (text) { self.load(text); })
      .catch(function (error) {
        self.setState("error");
        self.statusElement.textContent = "The recording cannot be played: " + error.message;
      });
  }

  Player.prototype.setState = function (state) {
    this.state = state;
    this.root.dataset.state = state;
    this.playButton.textContent = state === "playing" ? "Pause" : state === "ended" ? "Play again" : "Play";
    this.playButton.disabled = state === "loading" || state === "error";
  };

  Player.prototype.load = function (text) {
    var lines = text.split("\n").filter(function (line) { return line.trim() !== ""; });
    var header = JSON.parse(lines[0]);
    if (header.version !== 2) throw new Error("not an asciicast v2 recording");
    this.screen = new Screen(header.width || 80, header.height || 24);
    this.frames = lines.slice(1).map(function (line) { return JSON.parse(line); })
      .filter(function (frame) { return frame[1] === "o"; });
    this.duration = this.frames.length ? this.frames[this.frames.length - 1][0] : 0;
    this.render();
    this.setState("paused");
  };

  Player.prototype.speed = function () {
    return parseFloat(this.speedSelect.value) || 1;
  };

  Player.prototype.toggle = function () {
    if (this.state === "playing") {
      this.pause();
    } else {
      if (this.state === "ended") {
        this.screen.reset();
        this.position = 0;
        this.clock = 0;
      }
      this.play();
    }
  };

  Player.prototype.play = function () {
    this.setState("playing");
    this.started = performance.now() / 1000;
    this.startedAt = this.clock;
    this.step();
  };

  Player.prototype.pause = function () {
    clearTimeout(this.timer);
    this.clock = this.startedAt + (performance.now() / 1000 - this.started) * this.speed();
    this.setState("paused");
    this.render();
  };

  Player.prototype.step = function () {
    var self = this;
    if (this.state !== "playing") return;
    var now = this.startedAt + (performance.now() / 1000 - this.started) * this.speed();
    while (this.position < this.frames.length && this.frames[this.position][0] <= now) {
      this.screen.write(this.frames[this.position][2]);
      this.position += 1;
    }
    this.clock = now;
    this.render();
    if (this.position >= this.frames.length) {
      this.clock = this.duration;
      this.setState("ended");
      this.render();
      return;
    }
    var wait = (this.frames[this.position][0] - now) / this.speed();
    this.timer = setTimeout(function () { self.step(); }, Math.max(0, Math.min(wait, 1)) * 1000);
  };

  Player.prototype.render = function () {
    if (!this.screen) return;
    this.screenElement.textContent = this.screen.text();
    this.root.dataset.frame = String(this.position);
    this.statusElement.textContent = this.clock.toFixed(1) + "s / " + this.duration.toFixed(1) + "s, " +
      this.position + " of " + this.frames.length + " frames";
  };

  document.addEventListener("DOMContentLoaded", function () {
    var players = document.querySelectorAll(".player[data-cast]");
    for (var i = 0; i < players.length; i++) players[i].player = new Player(players[i]);
  });
})();
