"""Plain English words for the long-context tasks (:mod:`.long_tasks`): the keys of the magic-number
facts (an adjective and a noun), the variable names of the assignment chains (nouns in capitals) and
the words of the common-words lists (all three lists). Lowercase letters only, no word twice, and
none of the words the tasks' questions and wordings use."""

from __future__ import annotations

NOUNS = tuple("""
acorn almond anchor antelope apple apron arrow avocado badger bagel bakery balloon bamboo banana
banjo barrel basket beacon beaver bicycle bison blanket blender blossom bonnet bottle boulder bracelet
bridge bucket buffalo butter button cabbage cabin cactus camera canal candle cannon canoe canyon
caramel carpet carrot cashew castle cathedral cellar cello chalk cheetah cherry chestnut chimney
chisel cinnamon cloak clover cobbler coconut coffee compass cookie copper cottage cotton cougar
cradle crane crayon cricket crocodile crystal cupboard curtain cushion dagger daisy desert diamond
dolphin donkey dragon drum dune eagle easel elbow emerald engine falcon feather fence fern ferry
fiddle flute forest fossil fountain freckle frog garden garlic gazelle ginger giraffe glacier glove
goblet gondola goose gorilla granite grape gravel guitar hammer hammock hamster harbor harness harp
hatchet hazel hedgehog helmet heron honey horse iceberg igloo island jacket jaguar jasmine jelly
jungle kayak kettle kitten kiwi koala ladder lagoon lantern lemon leopard lettuce lighthouse lily
lizard llama lobster locket lotus magnet mango maple marsh meadow melon meteor mirror mitten monkey
moose mountain muffin mushroom napkin nectar noodle nutmeg oasis octopus olive orchard orchid ostrich
otter oven owl oyster palace panther paprika parrot pasta peach peacock peanut pebble pelican pencil
penguin pepper pier pigeon pillow pine pirate plank planet plum pocket pony potato prairie puddle
pumpkin puppet pyramid quarry quartz quilt rabbit raccoon radish raven rhubarb ribbon river robin
rocket saddle saffron salmon sandal sapphire satchel scarf scooter seashell shovel shrimp skillet
sled snail sparrow spider spinach sponge spruce squirrel starfish statue stove sunflower swan
tangerine teapot telescope thimble thistle tiger tomato tortoise tractor trumpet tulip tunnel turnip
turtle umbrella valley vanilla violin volcano vulture waffle wagon walnut walrus weasel wheat willow
wizard yacht yogurt zebra
""".split())

ADJECTIVES = tuple("""
amber ancient ashen azure balmy bitter bold brave breezy bright brisk bronze calm candid cheerful
chilly clever cloudy cozy crimson crisp curly dainty dapper dizzy drowsy dusky dusty eager elegant
fancy fearless fierce fluffy foggy fragile fragrant frosty frozen gentle giant gilded gleaming gloomy
glossy golden graceful grumpy happy hasty hazy hollow humble humid icy jagged jolly keen lavish lively
lofty lonely loyal lucky mellow merry mighty misty modest muddy murky narrow nervous nimble noble
pale patient peaceful plump polished polite proud quiet rapid rugged rustic rusty salty sandy scarlet
shaggy shallow shiny silent silver sleek sleepy slender smoky snowy solemn sour sparkling speckled
spicy spotted stately stormy striped sturdy sullen sunny swift tame tender thirsty tidy timid tiny
tranquil velvet violet vivid wandering warm weary whimsical wild windy wise witty wooden young zealous
""".split())

VERBS = tuple("""
bake blink bounce brew bury carve chase chew clap climb crawl dance dig dive doze drift fetch float
flutter fold frown gallop gargle gather giggle glide grin hike hiccup hop hover hum jog juggle kneel
knit knock laugh leap melt mend mumble nibble nod paint pedal plant polish ponder pour prance rattle
ripple roam row rummage sail scamper scoop scribble sew shiver shrug sing skate sketch ski skip slide
slumber sneeze sniff snore sparkle splash sprint squint stitch stroll stumble sway swim swing tinker
tiptoe trot tumble twirl waddle wander weave whisper whittle wiggle yawn yodel zigzag
""".split())

WORDS = NOUNS + ADJECTIVES + VERBS

__all__ = ["ADJECTIVES", "NOUNS", "VERBS", "WORDS"]
