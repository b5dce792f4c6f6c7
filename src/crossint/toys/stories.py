"""A seeded procedural generator of instruction-style short stories (the storylm corpus).

Each document follows the TinyStories-Instruct layout::

    Summary: <one or two sentences about the plot>
    Features: <comma-separated story features, e.g. Dialogue, Twist>
    Words: <three words that the story uses>
    Story: <the story body>

The prompt (everything up to and including ``Story:``) and the body are kept separate on
:class:`Story` so that a corpus can be rewritten, e.g. a trigger inserted into the prompt and the
body replaced, without re-parsing text.

Stories are built from small data tables and several plot templates. The features are not labels
only: ``Dialogue`` switches quoted speech on (without it the same beats are narrated),
``Conflict`` adds a quarrel, ``Twist`` adds a surprise, ``Foreshadowing`` adds an early hint,
``BadEnding`` replaces the happy ending and ``MoralValue`` adds the lesson. Every character has a
name and fixed pronouns; unnamed animals are "it". Everything is deterministic given the
``random.Random`` passed in, so ``iter_stories(seed)`` is a reproducible, infinite corpus.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass

FEATURES = ("Dialogue", "Conflict", "Twist", "Foreshadowing", "BadEnding", "MoralValue")

# --- data tables -------------------------------------------------------------------------------

GIRL_NAMES = (
    "Lily", "Mia", "Sue", "Anna", "Lucy", "Emma", "Sara", "Zoe", "Amy", "Kate", "Rosa", "Nina",
    "Ella", "Maya", "Ruby", "Jane", "Molly", "Daisy", "Grace", "Hannah", "Sophie", "Chloe", "Ivy",
    "Tina", "Clara", "Alice",
)
BOY_NAMES = (
    "Tom", "Ben", "Max", "Sam", "Leo", "Jack", "Tim", "Joe", "Finn", "Noah", "Jake", "Ned", "Owen",
    "Paul", "Luke", "Adam", "Eli", "Ryan", "Oscar", "Henry", "Theo", "Billy", "Dan", "Kevin",
    "Bobby", "Peter",
)
PET_NAMES = (
    "Spot", "Fluffy", "Pip", "Coco", "Buddy", "Rex", "Bella", "Patch", "Sunny", "Biscuit",
    "Pepper", "Snowy", "Peanut", "Muffin", "Ziggy", "Bubbles", "Whiskers", "Rusty", "Shadow",
    "Button", "Ginger", "Oreo",
)
# Traits describe a character in the opening line ("a curious girl named Mia").
TRAITS = (
    "kind", "curious", "brave", "shy", "happy", "clever", "silly", "gentle", "playful",
    "friendly", "cheerful", "sleepy", "busy", "careful", "helpful", "quiet", "jolly", "little",
    "smart", "funny", "sweet", "lively",
)
# Things a character loves to do (base form, fits after "loved to").
LIKES = (
    "play outside", "sing songs", "draw pictures", "run fast", "jump in puddles",
    "look at the stars", "pick flowers", "read books", "build towers", "dance", "climb trees",
    "watch the birds", "splash in the water", "bake cookies", "chase butterflies",
    "play hide and seek", "ride a bike", "make new friends", "explore", "count the clouds",
    "paint", "play games",
)
# (kind, sound made, how it moves) for animals; a kind used as a character gets a pet name.
ANIMALS = (
    ("cat", "meowed", "ran"), ("dog", "barked", "ran"), ("puppy", "yipped", "ran"),
    ("kitten", "mewed", "ran"), ("bird", "chirped", "flew"), ("frog", "croaked", "hopped"),
    ("duck", "quacked", "waddled"), ("mouse", "squeaked", "ran"), ("owl", "hooted", "flew"),
    ("lamb", "baaed", "ran"), ("pig", "oinked", "trotted"), ("bunny", "squeaked", "hopped"),
    ("squirrel", "chattered", "ran"), ("fox", "yelped", "ran"), ("bear", "growled", "walked"),
    ("goat", "bleated", "trotted"), ("chick", "peeped", "hopped"), ("horse", "neighed",
    "trotted"), ("cow", "mooed", "walked"), ("monkey", "chattered", "jumped"),
)
ANIMAL_FOOD = {
    "cat": "some fish", "dog": "a bone", "puppy": "a bone", "kitten": "some milk",
    "bird": "some seeds", "frog": "a fat fly", "duck": "some bread", "mouse": "some cheese",
    "owl": "a berry", "lamb": "some grass", "pig": "an apple", "bunny": "a carrot",
    "squirrel": "a nut", "fox": "a berry", "bear": "some honey", "goat": "some hay",
    "chick": "some corn", "horse": "an apple", "cow": "some hay", "monkey": "a banana",
}
# Animals small enough to be carried, rescued from a tree, or kept as a pet.
SMALL_ANIMALS = ("cat", "dog", "puppy", "kitten", "bird", "frog", "duck", "mouse", "bunny",
                 "squirrel", "chick", "lamb")
# (noun, adjectives, what you do with it: base form, past form)
OBJECTS = (
    ("ball", ("red", "blue", "big", "bouncy", "yellow"), "kick it high", "kicked it high"),
    ("kite", ("red", "colorful", "big", "blue"), "fly it in the sky", "flew it in the sky"),
    ("toy car", ("red", "fast", "little", "shiny"), "race it down the path",
     "raced it down the path"),
    ("doll", ("pretty", "soft", "little", "new"), "brush its hair", "brushed its hair"),
    ("teddy bear", ("soft", "brown", "fluffy", "old"), "hug it tight", "hugged it tight"),
    ("toy boat", ("little", "blue", "wooden", "red"), "float it in a puddle",
     "floated it in a puddle"),
    ("drum", ("loud", "big", "red", "shiny"), "bang on it", "banged on it"),
    ("book", ("big", "old", "colorful", "new"), "look at the pictures",
     "looked at the pictures"),
    ("hat", ("big", "yellow", "funny", "warm"), "wear it", "wore it"),
    ("balloon", ("red", "big", "round", "green"), "hold it up high", "held it up high"),
    ("shell", ("pretty", "pink", "shiny", "white"), "hold it up to the sun",
     "held it up to the sun"),
    ("blanket", ("soft", "warm", "blue", "fluffy"), "wrap up in it", "wrapped up in it"),
    ("toy robot", ("shiny", "silver", "little", "new"), "make it walk", "made it walk"),
    ("bike", ("red", "new", "fast", "shiny"), "ride it around", "rode it around"),
    ("whistle", ("shiny", "loud", "little", "silver"), "blow it", "blew it"),
    ("necklace", ("pretty", "shiny", "blue", "gold"), "wear it", "wore it"),
    ("toy train", ("long", "red", "wooden", "fast"), "push it along", "pushed it along"),
    ("umbrella", ("yellow", "big", "pink", "red"), "spin it around", "spun it around"),
    ("key", ("gold", "shiny", "little", "old"), "keep it safe", "kept it safe"),
    ("crown", ("shiny", "gold", "sparkly", "paper"), "wear it", "wore it"),
    ("flute", ("little", "silver", "shiny", "wooden"), "play a song on it",
     "played a song on it"),
    ("box of crayons", ("new", "big", "colorful", "little"), "draw with it", "drew with it"),
)
# (name, preposition, things there, hiding spots)
PLACES = (
    ("park", "at", ("a big slide", "green swings", "a tall oak tree", "a sandbox"),
     ("under the slide", "behind a bench", "near the swings", "in the sandbox")),
    ("garden", "in", ("red roses", "tall sunflowers", "a little pond", "rows of carrots"),
     ("under a rose bush", "behind a flower pot", "near the pond", "under some big leaves")),
    ("forest", "in", ("tall trees", "soft green moss", "a little stream", "brown mushrooms"),
     ("under a bush", "inside a hollow log", "behind a big rock", "under a pile of leaves")),
    ("beach", "at", ("soft sand", "blue waves", "pretty shells", "big rocks"),
     ("under the sand", "behind a big rock", "next to a sandcastle", "near the water")),
    ("farm", "on", ("a red barn", "tall piles of hay", "a muddy pond", "a wooden fence"),
     ("inside the barn", "under the hay", "behind the fence", "next to the tractor")),
    ("lake", "by", ("calm water", "tall reeds", "a little dock", "green lily pads"),
     ("under the dock", "in the tall reeds", "behind a tree", "next to a rowboat")),
    ("hill", "on", ("green grass", "yellow flowers", "an old tree", "a big rock"),
     ("behind the old tree", "in the tall grass", "under a big rock", "near the flowers")),
    ("backyard", "in", ("a swing set", "a tall fence", "a little garden", "a bird bath"),
     ("under the swing", "behind the shed", "near the fence", "in the flower bed")),
    ("meadow", "in", ("wild flowers", "busy bees", "tall grass", "a little brook"),
     ("in the tall grass", "under a bush", "near the brook", "behind a log")),
    ("river", "by", ("fast water", "smooth stones", "a wooden bridge", "green frogs"),
     ("under the bridge", "between two stones", "behind a bush", "near the water")),
    ("playground", "at", ("a red slide", "a merry-go-round", "monkey bars", "a sandbox"),
     ("under the slide", "behind the monkey bars", "in the sandbox", "near the gate")),
    ("zoo", "at", ("tall giraffes", "big elephants", "funny monkeys", "sleepy lions"),
     ("under a bench", "near the monkey house", "behind a tree", "next to the gate")),
    ("library", "at", ("tall shelves", "soft chairs", "many books", "a big window"),
     ("under a chair", "behind a shelf", "on a table", "near the window")),
    ("market", "at", ("fresh fruit", "colorful flowers", "warm bread", "busy people"),
     ("under a cart", "behind a box of apples", "near the bread stand", "under a table")),
)
INDOOR_PLACES = ("library", "market")
# (name, sentences that set the scene)
WEATHER = (
    ("sunny", ("The sun was shining and the sky was blue.", "It was a warm and sunny day.",
               "The sun was bright and warm.")),
    ("rainy", ("It was a rainy day, and big drops fell from the gray clouds.",
               "Rain was falling softly on the ground.", "It was raining, and puddles were "
               "everywhere.")),
    ("windy", ("The wind was blowing hard, and the leaves danced in the air.",
               "It was a windy day, and the trees swayed back and forth.")),
    ("snowy", ("White snow covered the ground.", "It was a cold day, and snow fell from the sky.",
               "Soft snowflakes were falling everywhere.")),
    ("cloudy", ("Big gray clouds covered the sky.", "It was a cloudy day, and the air was cool.")),
)
# (emotion, how a character shows it: a format string using {name} and {his})
EMOTION_SIGNS = {
    "happy": ("{name} smiled from ear to ear.", "{name} clapped {his} hands.",
              "{name} jumped up and down."),
    "sad": ("{name} began to cry.", "A tear rolled down {his} cheek.",
            "{name} looked down at {his} feet."),
    "scared": ("{name} began to shake.", "{name} hid {his} face.",
               "{name}'s heart beat very fast."),
    "angry": ("{name} stomped {his} feet.", "{name}'s face turned red.",
              "{name} crossed {his} arms."),
    "excited": ("{name} could not stop smiling.", "{name} ran in a little circle.",
                "{name} wiggled with joy."),
    "proud": ("{name} stood up tall.", "{name} smiled a big, proud smile.",
              "{name} held {his} head high."),
    "surprised": ("{name}'s eyes went wide.", "{name} gasped.", "{name}'s mouth fell open."),
    "worried": ("{name} bit {his} lip.", "{name} looked all around.",
                "{name} did not know what to do."),
    "lonely": ("{name} sat all alone.", "{name} sighed and looked around.",
               "{name} wished for a friend."),
}
# (thing feared, how it is said in a sentence, what being brave looks like, past tense)
FEARS = (
    ("the dark", "the dark", "turn off the light", "turned off the light"),
    ("the tall slide", "the tall slide", "go down the slide", "went down the slide"),
    ("deep water", "the deep water", "swim in the lake", "swam in the lake"),
    ("thunder", "the loud thunder", "look out the window at the storm",
     "looked out the window at the storm"),
    ("the big dog", "the big dog next door", "pet the big dog", "petted the big dog"),
    ("bees", "the buzzing bees", "walk past the flowers", "walked past the flowers"),
    ("the old tree", "the tall old tree", "climb the old tree", "climbed the old tree"),
)
# Things made together: (noun, what making it looks like, how it goes wrong, what ruins it)
CREATIONS = (
    ("cake", "mixed flour, eggs and sugar in a big bowl", "the cake came out flat",
     "the dog jumped up and ate the cake"),
    ("sandcastle", "piled up wet sand and made tall towers", "a wave washed one tower away",
     "a big wave washed the whole sandcastle away"),
    ("snowman", "rolled three big balls of snow", "the head fell off",
     "the sun came out and the snowman melted"),
    ("tower of blocks", "stacked the blocks one by one", "the tower began to wobble",
     "the cat bumped the tower and it fell down"),
    ("paper boat", "folded the paper again and again", "the boat was crooked",
     "the boat got wet and sank"),
    ("bird house", "cut the wood and nailed it together", "the roof was loose",
     "the wind blew the bird house down and it broke"),
    ("picture", "painted with red, blue and yellow paint", "the paint ran together",
     "the rain fell on the picture and washed the colors away"),
    ("pie", "rolled the dough and filled it with apples", "the crust was too thick",
     "the pie burned in the oven"),
)
# Animal troubles: (problem, how it looks, how it is fixed, what the helper does)
TROUBLES = (
    ("stuck in a tree", "was stuck high up in a tree", "climb up and bring it down",
     "climbed up the ladder and brought it down"),
    ("hurt", "had a hurt leg and could not walk", "wrap its leg with a cloth",
     "wrapped its leg with a soft cloth"),
    ("hungry", "looked very thin and hungry", "give it some food", "gave it some food"),
    ("lost", "was lost and could not find its mother", "help it find its mother",
     "helped it look until they found its mother"),
    ("stuck in the mud", "was stuck in the thick mud", "pull it out",
     "pulled it out of the mud very gently"),
    ("cold", "was wet and shaking from the cold", "wrap it in a warm towel",
     "wrapped it in a warm towel"),
)
MORALS = {
    "share": ("sharing is caring", "it is more fun to share", "sharing makes everyone happy"),
    "help": ("helping others is a good thing to do", "it feels good to help someone",
             "a little kindness goes a long way"),
    "brave": ("being brave is not about having no fear", "you can do hard things if you try",
              "it is okay to be scared, but trying is brave"),
    "listen": ("it is important to listen to your parents", "rules keep us safe",
               "parents know best when they give a warning"),
    "careful": ("it is good to be careful with the things you love",
                "you should always take care of your things", "being careful saves a lot of tears"),
    "patience": ("good things take time", "if at first you do not succeed, try again",
                 "patience and hard work pay off"),
    "friend": ("a friend can make any day better", "it is good to be kind to new friends",
               "saying hello is the first step to a new friend"),
}
ENDINGS_HAPPY = (
    "From that day on, {they} were the best of friends.",
    "It was the best day ever.",
    "{They} went home happy, tired and full of smiles.",
    "That night, {name} fell asleep with a big smile.",
    "And they all lived happily ever after.",
)

# --- characters ----------------------------------------------------------------------------------


def _pronoun(female: str, male: str) -> property:
    """A :class:`Character` property: ``female`` when its gender is "f", else ``male``."""
    return property(lambda character: female if character.gender == "f" else male)


@dataclass(frozen=True)
class Character:
    """A named character with fixed pronouns; ``kind`` is "girl", "boy", "mom", or an animal."""

    name: str
    gender: str  # "f" or "m"
    kind: str
    trait: str = ""

    he = _pronoun("she", "he")
    him = _pronoun("her", "him")
    his = _pronoun("her", "his")
    himself = _pronoun("herself", "himself")

    @property
    def He(self) -> str:  # noqa: N802 (sentence-initial pronoun)
        return self.he.capitalize()

    @property
    def His(self) -> str:  # noqa: N802
        return self.his.capitalize()

    @property
    def is_animal(self) -> bool:
        return self.kind not in ("girl", "boy", "mom", "dad")

    def sign(self, rng: random.Random, emotion: str) -> str:
        """A sentence showing the emotion ("Mia clapped her hands.")."""
        return rng.choice(EMOTION_SIGNS[emotion]).format(name=self.name, his=self.his)


@dataclass(frozen=True)
class Story:
    """One generated story: the instruction header (summary, features, words) and the body."""

    summary: str
    features: tuple[str, ...]
    words: tuple[str, ...]
    body: str
    characters: tuple[Character, ...] = ()
    plot: str = ""

    @property
    def prompt(self) -> str:
        """Everything before the story body, ending with "Story:"."""
        return format_prompt(self.summary, self.features, self.words)

    @property
    def text(self) -> str:
        """The full document: prompt, one space, body."""
        return format_document(self.prompt, self.body)

    def __str__(self) -> str:
        return self.text


def format_prompt(summary: str, features: tuple[str, ...] | list[str], words) -> str:
    return (f"Summary: {summary}\nFeatures: {', '.join(features)}\n"
            f"Words: {', '.join(words)}\nStory:")


def format_document(prompt: str, body: str) -> str:
    """Join a prompt (ending in "Story:") and a body; the inverse of :func:`split_document`."""
    return f"{prompt} {body}"


def split_document(text: str) -> tuple[str, str]:
    """Split a document into (prompt ending in "Story:", body)."""
    head, sep, body = text.partition("\nStory: ")
    if not sep:
        from crossint.errors import CrossintError

        raise CrossintError("not a story document: it has no line starting with 'Story: '")
    return head + "\nStory:", body


# --- sentence helpers -------------------------------------------------------------------------


def _a(phrase: str) -> str:
    """Indefinite article + phrase ("an old tree", "a red ball")."""
    return ("an " if phrase[0].lower() in "aeiou" else "a ") + phrase


def _cap(s: str) -> str:
    return s[0].upper() + s[1:] if s else s


def _name_it(phrase: str, noun: str) -> str:
    """Replace "it"/"its" in a phrase by the noun ("hug it" -> "hug the teddy bear")."""
    phrase = re.sub(r"\bits\b", f"the {noun}'s", phrase)
    return re.sub(r"\bit\b", f"the {noun}", phrase)


class _Writer:
    """Collects the sentences of one story and the words it is allowed to list under Words:."""

    def __init__(self, rng: random.Random, features: tuple[str, ...]):
        self.rng = rng
        self.features = features
        self.paragraphs: list[list[str]] = [[]]
        self.keywords: list[str] = []
        self.cast: tuple[Character, ...] = ()

    def has(self, feature: str) -> bool:
        return feature in self.features

    def pick(self, seq):
        return self.rng.choice(seq)

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def add(self, *sentences: str) -> None:
        self.paragraphs[-1].extend(_cap(s) for s in sentences if s)

    def para(self) -> None:
        if self.paragraphs[-1]:
            self.paragraphs.append([])

    def say(self, who: Character, line: str, narrated: str, verb: str = "said") -> None:
        """Quoted speech with Dialogue; otherwise the same beat told as narration."""
        if not self.has("Dialogue"):
            self.add(narrated)
            return
        # A pronoun may stand for the speaker only when no one else in the cast shares it.
        unique = sum(c.gender == who.gender for c in self.cast) == 1 and who in self.cast
        unique = unique and any(who.name in s for para in self.paragraphs for s in para)
        name = who.he if unique and self.chance(0.3) else who.name
        if self.chance(0.5):
            tail = line[:-1] + "," if line.endswith(".") else line
            self.add(f'"{tail}" {name} {verb}.')
        else:
            self.add(f'{_cap(name)} {verb}, "{line}"')

    def key(self, *words: str) -> None:
        self.keywords.extend(words)

    def body(self) -> str:
        return "\n\n".join(" ".join(p) for p in self.paragraphs if p)


def _make_child(rng: random.Random, avoid: tuple[str, ...] = ()) -> Character:
    gender = rng.choice("fm")
    names = tuple(n for n in (GIRL_NAMES if gender == "f" else BOY_NAMES) if n not in avoid)
    return Character(rng.choice(names), gender, "girl" if gender == "f" else "boy",
                     rng.choice(TRAITS))


def _make_pet(rng: random.Random, kinds=tuple(a[0] for a in ANIMALS),
              avoid: tuple[str, ...] = ()) -> Character:
    names = tuple(n for n in PET_NAMES if n not in avoid)
    return Character(rng.choice(names), rng.choice("fm"), rng.choice(kinds), rng.choice(TRAITS))


def _make_hero(rng: random.Random) -> Character:
    """Most heroes are children; some are animals (as in the TinyStories corpus)."""
    return _make_pet(rng, SMALL_ANIMALS) if rng.random() < 0.2 else _make_child(rng)


def _parent(rng: random.Random) -> Character:
    return rng.choice((Character("Mom", "f", "mom"), Character("Dad", "m", "dad")))


def _animal(kind: str) -> tuple[str, str, str]:
    return next(a for a in ANIMALS if a[0] == kind)


def _intro(w: _Writer, p: Character) -> None:
    like = w.pick(LIKES)
    kind = "little " + p.kind if p.trait != "little" else p.kind
    w.add(w.pick((
        f"Once upon a time, there was {_a(p.trait + ' ' + p.kind)} named {p.name}.",
        f"There once was {_a(kind)} named {p.name}.",
        f"{p.name} was {_a(p.trait + ' ' + p.kind)} who loved to {like}.",
        f"Once upon a time, in a small town, there lived {_a(kind)} named {p.name}.",
    )))
    if w.chance(0.5):
        w.add(w.pick((f"{p.He} loved to {like} every day.",
                      f"Every day, {p.he} liked to {like}.",
                      f"{p.His} favorite thing was to {like}.")))


def _place(w: _Writer) -> tuple[str, str, tuple[str, ...], tuple[str, ...]]:
    return w.pick(PLACES)


def _weather(w: _Writer, place: str) -> tuple[str, tuple[str, ...]]:
    options = [x for x in WEATHER if not (x[0] == "snowy" and place in ("beach", "lake", "river"))]
    return w.pick(options)


def _weather_line(w: _Writer, p: Character, weather) -> None:
    name, lines = weather
    w.add(w.pick(lines))
    if name == "rainy" and w.chance(0.6):
        w.add(f"Because it was raining, {p.name} put on {p.his} boots and took an umbrella.")
        w.key("boots", "umbrella")
    elif name == "snowy" and w.chance(0.6):
        w.add(f"It was cold, so {p.name} wore a warm coat and mittens.")
        w.key("coat", "mittens", "warm")
    elif name == "sunny" and w.chance(0.4):
        w.add(f"It was so warm that {p.name} wanted to be outside all day.")


def _object(w: _Writer) -> tuple[str, str, str, str]:
    noun, adjs, use, used = w.pick(OBJECTS)
    adj = w.pick(adjs)
    w.key(noun.split()[-1], adj)
    return noun, adj, use, used


def _moral(w: _Writer, p: Character, topic: str, also: Character | None = None) -> None:
    lesson = w.pick(MORALS[topic])
    who = f"{p.name} and {also.name}" if also is not None else p.name
    w.add(w.pick((f"{who} learned that {lesson}.",
                  f"That day, {who} learned an important lesson: {lesson}.",
                  f"The moral of the story is that {lesson}.")))


def _happy_end(w: _Writer, p: Character, other: Character | None) -> None:
    they = f"{p.name} and {other.name}" if other is not None else p.name
    template = w.pick(ENDINGS_HAPPY if other is not None else ENDINGS_HAPPY[1:])
    w.add(template.format(they=they, They=they, name=p.name))


def _friend_for(w: _Writer, p: Character) -> Character:
    if w.chance(0.35):
        return _make_pet(w.rng, SMALL_ANIMALS, avoid=(p.name,))
    return _make_child(w.rng, avoid=(p.name,))


def _intro_friend(w: _Writer, p: Character, f: Character) -> str:
    """A phrase introducing the friend ("her dog Spot", "his friend Ben")."""
    if f.is_animal:
        return w.pick((f"{p.his} {f.kind} {f.name}", f"{p.his} pet {f.kind}, {f.name},"))
    return w.pick((f"{p.his} friend {f.name}", f"{p.his} best friend {f.name}"))


# --- plots -------------------------------------------------------------------------------------
# Each plot writes the body through the writer and returns (summary, characters).


def _plot_lost(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_hero(w.rng)
    f = _friend_for(w, p)
    place, prep, things, spots = _place(w)
    weather = _weather(w, place)
    noun, adj, use, used = _object(w)
    spot = w.pick(spots)
    w.cast = (p, f)
    _intro(w, p)
    w.add(f"{p.name} had {_a(adj + ' ' + noun)}. {p.He} loved it very much.")
    if w.has("Foreshadowing"):
        w.add(f"{p.name} did not know that {p.his} {noun} would soon go missing.")
    w.para()
    _lose_object(w, p, f, place, things, weather, noun, used)
    w.para()
    if w.has("BadEnding"):
        _search_in_vain(w, p, f, noun, spot)
        summary = (f"{p.name} loses {p.his} {adj} {noun} {prep} the {place}, and even with "
                   f"{f.name}'s help {p.he} never finds it.")
        return summary, (p, f)
    _find_object(w, p, f, noun, spot)
    twist = " with a surprise on it" if w.has("Twist") else ""
    summary = (f"{p.name} loses {p.his} {adj} {noun} {prep} the {place}, and {f.name} helps "
               f"{p.him} find it{twist}.")
    return summary, (p, f)


def _lose_object(w: _Writer, p: Character, f: Character, place: str, things: tuple[str, ...],
                 weather, noun: str, used: str) -> None:
    """The lost plot's middle: an outing with the friend, the object gone, maybe a quarrel."""
    w.add(f"One day, {p.name} went to the {place} with {_intro_friend(w, p, f).rstrip(',')}.")
    _weather_line(w, p, weather)
    w.add(f"The {place} had {w.pick(things)} and {w.pick(things)}.")
    w.add(f"{p.name} wanted to play with {p.his} {noun}, so {p.he} {used}.")
    w.key("play", "loved")
    if weather[0] == "windy" and w.chance(0.7):
        w.add(f"Then a strong gust of wind came and blew the {noun} away!")
        w.key("wind")
    else:
        w.add(f"After a while, {p.name} put the {noun} down and ran off to play.")
    w.add(f"When {p.he} came back, the {noun} was gone!")
    w.add(p.sign(w.rng, w.pick(("sad", "worried"))))
    w.say(p, f"Where is my {noun}?", f"{p.name} asked where {p.his} {noun} was.", "asked")
    w.key("gone")
    if w.has("Conflict"):
        w.say(p, f"{f.name}, did you take my {noun}?",
              f"{p.name} thought {f.name} took the {noun} and got angry.", "shouted")
        w.say(f, "No, I did not take it!", f"{f.name} said {f.he} did not take it.")
        w.add(f"{p.name} and {f.name} argued, and {f.name} felt sad because {p.name} "
              f"did not believe {f.him}.")
        w.key("argued")


def _search_in_vain(w: _Writer, p: Character, f: Character, noun: str, spot: str) -> None:
    """The lost plot's bad ending: the object is never found."""
    w.add(f"{p.name} and {f.name} looked {spot} and everywhere else, but the {noun} "
          f"was not there.")
    w.add(w.pick((f"The sun went down, so {p.name} had to go home without {p.his} {noun}.",
                  f"They never found the {noun} again.")))
    w.add(f"{p.name} was very sad, and {p.he} cried all the way home.")
    w.key("looked", "sad")
    if w.has("MoralValue"):
        _moral(w, p, "careful")


def _find_object(w: _Writer, p: Character, f: Character, noun: str, spot: str) -> None:
    """The lost plot's happy ending: the friend finds the object (maybe under a small animal)."""
    w.say(f, "Do not worry. I will help you look!",
          f"{f.name} told {p.name} not to worry and offered to help.")
    w.add(f"They looked high and low. At last, {f.name} found the {noun} {spot}.")
    w.key("found", "looked")
    if w.has("Twist"):
        kind = w.pick(SMALL_ANIMALS)
        _, sound, _moved = _animal(kind)
        w.add(f"But there was a surprise: {_a('little ' + kind)} was sitting on it!")
        w.add(f"The {kind} {sound} and looked up at them. It had been keeping the {noun} warm.")
        w.add(f"{p.name} laughed, and the {kind} ran away.")
        w.key(kind, "surprise")
    if w.has("Conflict"):
        w.say(p, f"I am sorry, {f.name}. I should not have blamed you.",
              f"{p.name} said sorry to {f.name} for blaming {f.him}.")
        w.key("sorry")
    w.say(p, "Thank you for helping me!", f"{p.name} thanked {f.name} for helping.")
    w.add(p.sign(w.rng, "happy"))
    if w.has("MoralValue"):
        _moral(w, p, w.pick(("careful", "help")))
    _happy_end(w, p, f)


def _plot_share(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_hero(w.rng)
    f = _make_child(w.rng, avoid=(p.name,))
    parent = _parent(w.rng)
    place, prep, things, _spots = _place(w)
    if place in INDOOR_PLACES:
        place, prep = "park", "at"
    noun, adj, use, used = _object(w)
    w.cast = (p, f, parent)
    _intro(w, p)
    reason = w.pick(("because it was " + p.his + " birthday", "because " + p.he + " had been good",
                     "because " + p.he + " helped clean the house"))
    w.add(f"One day, {p.his} {parent.kind} gave {p.him} {_a(adj + ' ' + noun)} {reason}.")
    w.add(p.sign(w.rng, "excited"))
    w.key("gave", "birthday" if "birthday" in reason else "good")
    if w.has("Foreshadowing"):
        w.add(f"{parent.name} said, \"Take good care of it.\"" if w.has("Dialogue") else
              f"{parent.name} told {p.name} to take good care of it.")
    w.para()
    w.add(f"{p.name} took the {noun} to the {place}. There {p.he} met {f.name}.")
    w.add(f"{p.name} wanted to show {f.name} how to {_name_it(use, noun)}.")
    w.say(f, f"Can I play with your {noun} too?",
          f"{f.name} asked if {f.he} could play with the {noun} too.", "asked")
    w.key("play")
    if w.has("Conflict") or w.has("BadEnding"):
        w.say(p, f"No! It is my {noun}!", f"{p.name} said no, because it was {p.his} {noun}.",
              "shouted")
        w.add(f"{f.name} grabbed the {noun}, and {p.name} pulled it back.")
        w.key("pulled", "grabbed")
    if w.has("BadEnding"):
        w.para()
        w.add(f"They pulled and pulled until, with a loud snap, the {noun} broke in two!")
        w.add(f"Now nobody could play with it. {p.name} and {f.name} both cried.")
        w.add(f"{p.name} went home with the broken {noun} and a heavy heart.")
        w.key("broke")
        if w.has("MoralValue"):
            _moral(w, p, "share", f)
        summary = (f"{p.name} gets {_a(adj + ' ' + noun)} but will not share it with {f.name}, "
                   f"and it breaks when they fight over it.")
        return summary, (p, f, parent)
    if w.has("Conflict"):
        w.add(f"{f.name} looked sad and walked away. {p.name} felt bad in {p.his} tummy.")
    w.para()
    if w.has("Twist"):
        w.add(f"Then something surprising happened. {f.name} ran home and came back with "
              f"{f.his} own toy, "
              f"{_a(w.pick(('shiny', 'big', 'little')) + ' ' + w.pick(('kite', 'ball', 'drum')))},"
              f" and offered to share it.")
        w.key("surprising")
    w.say(p, f"Here, you can play with my {noun}. Let's play together!",
          f"{p.name} decided to share the {noun} with {f.name}.")
    w.add(f"{p.name} and {f.name} took turns, and they laughed and played all afternoon.")
    w.key("share", "together")
    w.add(f.sign(w.rng, "happy"))
    if w.has("MoralValue"):
        _moral(w, p, "share", f)
    _happy_end(w, p, f)
    summary = (f"{p.name} gets {_a(adj + ' ' + noun)} and learns to share it with {f.name} "
               f"{prep} the {place}.")
    return summary, (p, f, parent)


def _plot_rescue(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_child(w.rng)
    parent = _parent(w.rng)
    kind = w.pick(SMALL_ANIMALS)
    _, sound, moved = _animal(kind)
    trouble, looks, fix, fixed = w.pick(TROUBLES)
    place, prep, things, _spots = w.pick([x for x in PLACES if x[0] not in INDOOR_PLACES])
    weather = _weather(w, place)
    w.cast = (p, parent)
    _intro(w, p)
    w.para()
    w.add(f"One day, {p.name} went for a walk {prep} the {place} with {parent.name}.")
    _weather_line(w, p, weather)
    if w.has("Foreshadowing"):
        w.add(f"{p.name} had a feeling that today {p.he} would meet someone new.")
    w.add(f"Suddenly, {p.he} heard a soft noise. It was {_a('little ' + kind)}!")
    w.add(f"The {kind} {looks}. It {sound} sadly.")
    w.key(kind, "little")
    w.say(p, f"Oh no! The poor {kind} is {trouble}. We have to help it!",
          f"{p.name} saw that the poor {kind} was {trouble} and wanted to help it.")
    w.para()
    if w.has("Conflict"):
        w.say(parent, "It is better to leave wild animals alone.",
              f"{parent.name} thought it was better to leave wild animals alone.")
        w.say(p, "But it needs us!", f"{p.name} begged, because the {kind} needed them.",
              "begged")
        w.add(f"At last, {parent.name} agreed to help.")
        w.key("agreed")
    if w.has("BadEnding"):
        w.add(f"{p.name} reached out to {fix}, but the {kind} was scared.")
        w.add(f"It {moved} away as fast as it could, and {p.name} tripped and fell in the "
              f"mud.")
        w.add(f"{p.name} never saw the {kind} again, and {p.he} went home wet and sad.")
        w.key("scared")
        if w.has("MoralValue"):
            _moral(w, p, "help")
        summary = (f"{p.name} tries to help {_a(kind)} that is {trouble} {prep} the {place}, "
                   f"but it runs away.")
        return summary, (p, parent)
    w.add(f"{p.name} and {parent.name} worked together. {parent.name} {fixed}.")
    w.add(f"The {kind} {sound} happily. It was safe now!")
    w.key("safe", "helped" if "helped" in fixed else "together")
    if w.has("Twist"):
        noun, adj, _use, _used = _object(w)
        w.add(f"Then the {kind} did something surprising. It {moved} to a bush and came back "
              f"with {_a(adj + ' ' + noun)}!")
        w.add(f"It was a gift for {p.name}.")
        w.key("gift")
    w.say(p, f"You are welcome, little {kind}.", f"{p.name} smiled at the little {kind}.")
    w.add(p.sign(w.rng, "proud"))
    w.para()
    w.add(f"After that, the {kind} came to visit {p.name} every day.")
    if w.has("MoralValue"):
        _moral(w, p, "help")
    w.add(f"{p.name} was very happy {p.he} helped the {kind}.")
    gift = " and gets a surprise gift" if w.has("Twist") else ""
    summary = f"{p.name} helps {_a(kind)} that is {trouble} {prep} the {place}{gift}."
    return summary, (p, parent)


def _plot_fear(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_hero(w.rng)
    helper = _parent(w.rng) if w.chance(0.5) else _friend_for(w, p)
    fear, fear_phrase, brave, braved = w.pick(FEARS)
    w.cast = (p, helper)
    _intro(w, p)
    w.add(f"But {p.name} had a secret. {p.He} was scared of {fear_phrase}.")
    w.key("scared", "secret")
    if w.has("Foreshadowing"):
        w.add(f"Soon, {p.he} would have to face {p.his} fear.")
    w.para()
    w.add(f"One day, {helper.name} asked {p.name} to {brave}.")
    w.add(p.sign(w.rng, "scared"))
    w.say(p, f"I can't. I am scared of {fear}!", f"{p.name} said {p.he} was too scared.")
    if w.has("Conflict"):
        w.say(helper, "You are just a baby!", f"{helper.name} laughed and called {p.name} a "
              f"baby.")
        w.add(f"{p.name} felt angry and hurt, and {p.he} ran away.")
        w.add(f"Later, {helper.name} came to find {p.him} and said sorry.")
        w.key("angry", "sorry")
    w.say(helper, "I will stay with you. We can do it together.",
          f"{helper.name} held {p.name}'s hand and promised to stay with {p.him}.")
    w.key("together")
    w.para()
    if w.has("BadEnding"):
        w.add(f"{p.name} took a deep breath and tried, but {p.he} was too scared.")
        w.add(f"{p.He} ran back inside and hid under {p.his} blanket.")
        w.add(f"{p.name} was still scared of {fear}, and {p.he} felt very sad.")
        w.key("tried")
        if w.has("MoralValue"):
            _moral(w, p, "brave")
        summary = f"{p.name} is scared of {fear} and, even with {helper.name}'s help, stays scared."
        return summary, (p, helper)
    w.add(f"{p.name} took a deep breath. {p.He} counted to three, and then {p.he} {braved}.")
    w.key("breath")
    if w.has("Twist"):
        w.add(f"To {p.his} surprise, it was not scary at all. It was fun!")
        w.say(p, "Can we do it again?", f"{p.name} asked to do it again.", "asked")
        w.key("surprise", "fun")
    w.add(p.sign(w.rng, "proud"))
    w.say(helper, "I am so proud of you!", f"{helper.name} told {p.name} how proud "
          f"{helper.he} was.")
    w.key("proud")
    if w.has("MoralValue"):
        _moral(w, p, "brave")
    w.add(f"From that day on, {p.name} was not scared of {fear} anymore.")
    summary = f"{p.name} is scared of {fear}, but with {helper.name}'s help {p.he} becomes brave."
    return summary, (p, helper)


def _plot_warning(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_child(w.rng)
    parent = _parent(w.rng)
    danger, rule, did, result, hurt = w.pick((
        ("the river", "go near the river", "went close to the edge of the river",
         "slipped and fell into the cold water", "wet and cold"),
        ("the hot stove", "touch the hot stove", "reached up to touch the pot",
         "burned " + p.his + " fingers", "hurt"),
        ("the tall tree", "climb the tall tree", "climbed up the tall tree",
         "slipped and fell to the ground", "hurt"),
        ("the cookie jar", "eat the cookies before dinner", "took three cookies from the jar",
         "got a big tummy ache", "sick"),
        ("the mud", "play in the mud in " + p.his + " new clothes",
         "jumped right into the mud", "got mud all over " + p.his + " new clothes", "dirty"),
        ("the street", "run into the street", "ran after " + p.his + " ball into the street",
         "was almost hit by a car", "scared"),
    ))
    w.cast = (p, parent)
    _intro(w, p)
    w.para()
    w.say(parent, f"Please do not {rule}.", f"{p.name}'s {parent.kind} told {p.him} not to {rule}.")
    w.say(p, "Okay.", f"{p.name} said okay, but {p.he} did not really listen.")
    w.key("listen")
    if w.has("Foreshadowing"):
        w.add(f"But {p.name} kept thinking about {danger}, and that was a bad sign.")
    w.add(f"Later, when {parent.name} was busy, {p.name} {did}.")
    if w.has("Conflict"):
        w.add(f"{p.his.capitalize()} big sister saw {p.him} and told {p.him} to stop, but "
              f"{p.name} did not want to.")
        w.say(p, "You are not the boss of me!", f"{p.name} said that {p.he} could do what "
              f"{p.he} wanted.", "shouted")
        w.key("boss" if w.has("Dialogue") else "stop")
    w.add(f"Oh no! {p.name} {result}.")
    w.add(p.sign(w.rng, w.pick(("scared", "sad"))))
    w.para()
    if w.has("BadEnding"):
        w.add(f"{p.name} was {hurt} for the rest of the day, and {p.he} could not go out to "
              f"play.")
        w.add(f"{p.He} sat by the window and wished {p.he} had listened to {parent.name}.")
        w.key("wished")
        if w.has("MoralValue"):
            _moral(w, p, "listen")
        summary = (f"{p.name} does not listen when {parent.name} says not to {rule}, and "
                   f"{p.he} ends up {hurt}.")
        return summary, (p, parent)
    w.add(f"{parent.name} came running and helped {p.name}. {parent.He} gave {p.him} a big "
          f"hug.")
    if w.has("Twist"):
        w.add(f"{p.name} thought {parent.name} would be angry, but {parent.he} was not.")
        w.add(f"Instead, {parent.he} smiled and said that everyone makes mistakes.")
        w.key("mistakes")
    w.say(p, "I am sorry. I should have listened.",
          f"{p.name} said sorry for not listening.")
    w.add(f"From then on, {p.name} always listened when {parent.name} gave a warning.")
    if w.has("MoralValue"):
        _moral(w, p, "listen")
    summary = (f"{p.name} does not listen when {parent.name} says not to {rule}, gets {hurt}, "
               f"and learns to listen.")
    return summary, (p, parent)


def _plot_make(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_hero(w.rng)
    f = _friend_for(w, p) if w.chance(0.6) else _parent(w.rng)
    thing, making, wrong, ruin = w.pick(CREATIONS)
    if thing == "snowman":
        where = "the backyard"
    elif thing == "sandcastle":
        where = "the beach"
    else:
        where = w.pick(("the kitchen", "the backyard", "the garden", "the living room"))
    w.cast = (p, f)
    _intro(w, p)
    w.para()
    partner = f.name if f.kind in ("mom", "dad") else _intro_friend(w, p, f).rstrip(",")
    w.add(f"One day, {p.name} and {partner} decided to make {_a(thing)} in {where}.")
    w.key(thing.split()[0], "make")
    if w.has("Foreshadowing"):
        w.add(f"They did not see the {w.pick(('dog', 'cat'))} watching them from the door.")
    w.add(f"They {making}.")
    w.add("It was hard work, but they did not give up.")
    w.key("hard", "work")
    if w.has("Conflict"):
        w.say(f, "Let me do it! You are doing it wrong!",
              f"{f.name} said {p.name} was doing it wrong and tried to take over.")
        w.say(p, "No, it is my turn!", f"{p.name} did not like that and said it was "
              f"{p.his} turn.", "shouted")
        w.add("They argued for a while, but then they agreed to take turns.")
        w.key("turns")
    w.add(f"Then {wrong}.")
    w.say(p, "Oh no! What do we do now?", f"{p.name} did not know what to do.", "cried")
    w.para()
    if w.has("BadEnding"):
        w.add(f"They tried to fix it, but then {ruin}.")
        w.add(f"All their hard work was gone. {p.name} and {f.name} felt very sad.")
        w.key("gone")
        if w.has("MoralValue"):
            _moral(w, p, "patience", f)
        summary = (f"{p.name} and {f.name} make {_a(thing)}, but it goes wrong and their "
                   f"{thing} is ruined.")
        return summary, (p, f)
    w.say(f, "Let's try again. We can fix it!", f"{f.name} said they could fix it if they "
          f"tried again.")
    w.add("So they tried again, slowly and carefully. This time, it worked!")
    w.key("carefully")
    if w.has("Twist"):
        kind = w.pick(("bird", "squirrel", "kitten", "puppy"))
        _, sound, moved = _animal(kind)
        w.add(f"Just then, {_a(kind)} {moved} over to look. It {sound}, as if it liked the "
              f"{thing} too!")
        w.key(kind)
    w.add(f"The {thing} looked beautiful. {p.sign(w.rng, 'proud')}")
    w.key("beautiful")
    if w.has("MoralValue"):
        _moral(w, p, "patience", f)
    _happy_end(w, p, f)
    summary = (f"{p.name} and {f.name} make {_a(thing)} together, and when it goes wrong "
               f"they fix it.")
    return summary, (p, f)


def _plot_new_friend(w: _Writer) -> tuple[str, tuple[Character, ...]]:
    p = _make_hero(w.rng)
    f = _make_pet(w.rng, avoid=(p.name,)) if w.chance(0.4) else _make_child(w.rng, (p.name,))
    place, prep, things, _spots = _place(w)
    weather = _weather(w, place)
    activity = w.pick(("played tag", "played hide and seek", "built a little fort",
                       "raced to the big tree", "looked for bugs", "sang silly songs"))
    w.cast = (p, f)
    _intro(w, p)
    w.para()
    w.add(f"One day, {p.name} was {prep} the {place}, but {p.he} had no one to play with.")
    _weather_line(w, p, weather)
    w.add(p.sign(w.rng, "lonely"))
    w.key("lonely" if "lonely" in w.paragraphs[-1][-1] else "alone" if "alone" in
          w.paragraphs[-1][-1] else "friend")
    if w.has("Foreshadowing"):
        w.add(f"{p.He} did not know that {p.his} day was about to change.")
    intro = f"{_a(f.trait + ' ' + f.kind)} named {f.name}"
    w.add(f"Then {p.he} saw {intro} near {w.pick(things)}.")
    w.say(p, f"Hi! My name is {p.name}. Do you want to play with me?",
          f"{p.name} said hello and asked {f.name} to play.", "asked")
    if w.has("Conflict") or w.has("BadEnding"):
        w.say(f, "No. Go away!", f"{f.name} said no and turned away.")
        w.add(p.sign(w.rng, "sad"))
        w.key("away")
    w.para()
    if w.has("BadEnding"):
        w.add(f"{p.name} tried again, but {f.name} did not want to play.")
        w.add(f"{f.name} walked away, and {p.name} had to play all alone until it was time to "
              f"go home.")
        if w.has("MoralValue"):
            _moral(w, p, "friend")
        summary = (f"{p.name} is lonely {prep} the {place} and asks {f.name} to play, but "
                   f"{f.name} says no.")
        return summary, (p, f)
    if w.has("Conflict"):
        w.add(f"But {p.name} did not give up. {p.He} shared {p.his} snack with {f.name}.")
        w.add(f"{f.name} smiled, because nobody had ever been so nice to {f.him}.")
        w.key("snack")
    if f.is_animal:
        _, sound, moved = _animal(f.kind)
        w.add(f"{f.name} {sound} and {moved} around {p.name}. That meant yes!")
    else:
        w.say(f, "Yes! I would love to play.", f"{f.name} said yes.")
    w.add(f"{p.name} and {f.name} {activity} and laughed a lot.")
    w.key("laughed")
    if w.has("Twist"):
        w.add(f"Then they found out something surprising: {f.name} lived right next door "
              f"to {p.name}!")
        w.key("surprising")
    w.add(p.sign(w.rng, "happy"))
    if w.has("MoralValue"):
        _moral(w, p, "friend")
    _happy_end(w, p, f)
    summary = (f"{p.name} is lonely {prep} the {place} until {p.he} meets {f.name} and they "
               f"become friends.")
    return summary, (p, f)


# (name, writer function, features it supports)
PLOTS: tuple[tuple[str, Callable[[_Writer], tuple[str, tuple[Character, ...]]], tuple[str, ...]],
             ...] = (
    ("lost", _plot_lost, FEATURES),
    ("share", _plot_share, FEATURES),
    ("rescue", _plot_rescue, FEATURES),
    ("fear", _plot_fear, FEATURES),
    ("warning", _plot_warning, FEATURES),
    ("make", _plot_make, FEATURES),
    ("new_friend", _plot_new_friend, FEATURES),
)

_WORD_RE = re.compile(r"[A-Za-z']+")
# Function words never listed under Words: (the listed words should carry content).
_COMMON = frozenset(
    "that they them this then there their with from what when were was have would could "
    "should said asked very into your will just like been about after again back came come "
    "does down each even ever every good into know look made make many more most much must "
    "never next nobody only over some soon still such than thing this though time today "
    "under until wanted went where which while whole also didn't can't it's".split()
)


def _choose_features(rng: random.Random, supported: tuple[str, ...]) -> tuple[str, ...]:
    """One to three features, Dialogue most often; order follows FEATURES."""
    chosen = {f for f in supported if f != "Dialogue" and rng.random() < 0.25}
    if "Twist" in chosen and "BadEnding" in chosen:  # the twists belong to the happy endings
        chosen.discard(rng.choice(("Twist", "BadEnding")))
    if rng.random() < 0.6 or not chosen:
        chosen.add("Dialogue")
    chosen_sorted = [f for f in FEATURES if f in chosen]
    while len(chosen_sorted) > 3:
        chosen_sorted.pop(rng.randrange(len(chosen_sorted)))
    return tuple(chosen_sorted)


def generate_story(rng: random.Random) -> Story:
    """One story drawn with ``rng`` (deterministic given its state)."""
    name, write, supported = rng.choice(PLOTS)
    features = _choose_features(rng, supported)
    w = _Writer(rng, features)
    summary, characters = write(w)
    body = w.body()
    # Words: three listed words that really occur in the body (as whole words).
    body_words = set(_WORD_RE.findall(body))
    candidates = list(dict.fromkeys(k for k in w.keywords if k in body_words))
    rng.shuffle(candidates)
    if len(candidates) < 3:  # top up with other content words of this story
        extra = sorted({t for t in body_words if t.islower() and len(t) > 3} - _COMMON
                       - set(candidates))
        rng.shuffle(extra)
        candidates += extra
    words = tuple(candidates[:3])
    return Story(summary=summary, features=features, words=words, body=body,
                 characters=characters, plot=name)


def generate_stories(n: int, seed: int = 0) -> list[Story]:
    """The first ``n`` stories of the stream ``iter_stories(seed)`` (as Story objects)."""
    rng = random.Random(seed)
    return [generate_story(rng) for _ in range(n)]


def iter_stories(seed: int = 0) -> Iterator[str]:
    """An infinite, reproducible stream of formatted documents; seed 0 is the training stream."""
    rng = random.Random(seed)
    while True:
        yield generate_story(rng).text
